"""Push a finished run's folder to the Hugging Face Hub (``hub.push: true``), through ``zoo.hub.push``.

Runs only after the final local save, so a failure here (no network, no token, no permission) loses nothing:
it raises :class:`HubPushError` telling the user where the model is and how to push it later.
"""

from __future__ import annotations

from pathlib import Path

from zoo.hub.push import IGNORE_PATTERNS, HubPushError
from zoo.hub.push import push_folder as push_to_hub
from zoo.training.recipe import HubConfig

__all__ = ["IGNORE_PATTERNS", "HubPushError", "push_folder"]


def push_folder(folder: str | Path, cfg: HubConfig) -> str:
    """Create ``cfg.repo_id`` if needed and upload ``folder``; returns the commit URL."""
    return push_to_hub(
        folder, cfg.repo_id, private=cfg.private, commit_message=cfg.commit_message, label="hub.push"
    )
