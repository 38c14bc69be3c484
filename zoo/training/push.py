"""Push a finished run's folder to the Hugging Face Hub (``hub.push: true``).

Runs only after the final local save, so a failure here (no network, no token, no permission) loses nothing:
it raises :class:`HubPushError` telling the user where the model is and how to push it later. ``HF_ENDPOINT`` and
``HF_TOKEN`` are honoured by ``huggingface_hub`` itself.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from zoo.training.recipe import HubConfig

# Training state stays local: the Hub folder is the model, its tokenizer, recipe, card, metrics and logs.
IGNORE_PATTERNS = ["checkpoints/**", ".tmp-*", "**/.tmp-*"]


class HubPushError(RuntimeError):
    pass


def push_folder(folder: str | Path, cfg: HubConfig) -> str:
    """Create ``cfg.repo_id`` if needed and upload ``folder``; returns the commit URL."""
    api = HfApi()
    try:
        api.create_repo(repo_id=cfg.repo_id, private=cfg.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=cfg.repo_id,
            folder_path=str(folder),
            commit_message=cfg.commit_message,
            ignore_patterns=IGNORE_PATTERNS,
            repo_type="model",
        )
    except Exception as err:
        raise HubPushError(
            f"hub.push: could not push {str(folder)!r} to {cfg.repo_id!r} at {api.endpoint}: "
            f"{type(err).__name__}: {err}\nThe model is saved locally in {str(folder)!r}; push it later with "
            f"`hf upload {cfg.repo_id} {folder}` (set HF_TOKEN, and HF_ENDPOINT for a mirror)."
        ) from err
    return str(getattr(info, "commit_url", info))
