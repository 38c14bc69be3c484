"""Push a finished run's folder to the Hugging Face Hub (``hub.push: true``), through ``zoo.hub.push``.

What is uploaded is the run's model exported as ``python -m zoo.hub export`` writes it (flattened modeling code,
``auto_map``, weights, tokenizer, card, ``requirements.txt``), so that it loads with ``trust_remote_code=True``
where zoo is not installed. Runs only after the final local save, so a failure here (no network, no token, no
permission) loses nothing: it raises :class:`HubPushError` telling the user where the model is and how to push it
later.
"""

from __future__ import annotations

from pathlib import Path

from zoo.hub.push import IGNORE_PATTERNS, HubPushError, push_model
from zoo.training.recipe import HubConfig

__all__ = ["IGNORE_PATTERNS", "HubPushError", "push_folder"]


def push_folder(folder: str | Path, cfg: HubConfig) -> str:
    """Export the model saved in ``folder``, create ``cfg.repo_id`` if needed and upload the export; returns the
    commit URL."""
    return push_model(
        folder, cfg.repo_id, private=cfg.private, commit_message=cfg.commit_message, label="hub.push"
    )
