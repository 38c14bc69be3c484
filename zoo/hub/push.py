"""Upload a model folder to the Hugging Face Hub: ``create_repo`` then ``upload_folder``.

One implementation for ``python -m zoo.hub push`` and the trainer's ``hub.push``. ``HF_ENDPOINT`` (a mirror or a
private Hub) and ``HF_TOKEN`` are read by ``huggingface_hub`` itself. Pushing only reads the folder, so a failure
(no network, no token, no permission) loses nothing local: it raises :class:`HubPushError` saying where the model
is and how to push it later.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

# Training state stays local: the Hub folder is the model, its tokenizer, code, recipe, card, metrics and logs.
IGNORE_PATTERNS = ["checkpoints/**", ".tmp-*", "**/.tmp-*", "**/__pycache__/**", "__pycache__/**"]
COMMIT_MESSAGE = "Upload model trained with zoo"


class HubPushError(RuntimeError):
    """The push failed; the message names the folder (still intact) and the command to retry."""


def files_to_upload(folder: str | Path, ignore_patterns=IGNORE_PATTERNS) -> list[str]:
    """The paths (relative, POSIX) that ``upload_folder`` would send from ``folder``."""
    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    # upload_folder adds its own defaults (.git, .cache/huggingface) to the patterns it is given
    return list(filter_repo_objects(paths, ignore_patterns=[*ignore_patterns, *DEFAULT_IGNORE_PATTERNS]))


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str = COMMIT_MESSAGE,
    dry_run: bool = False,
    api: HfApi | None = None,
    label: str = "zoo.hub push",
) -> str | list[str]:
    """Create ``repo_id`` (a model repo) if needed and upload ``folder`` to it, on branch ``revision`` (created
    if missing); returns the commit URL. ``dry_run``: touch nothing, return the files that would be uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{label}: folder {str(folder)!r} does not exist or is not a directory")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{label}: {str(folder)!r} has no config.json; push a model folder (saved or exported)"
        )
    if dry_run:
        return files_to_upload(folder)
    api = api or HfApi()
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            ignore_patterns=IGNORE_PATTERNS,
            repo_type="model",
            revision=revision,
        )
    except Exception as err:
        retry = f"python -m zoo.hub push {folder} --repo-id {repo_id}"
        if revision is not None:
            retry += f" --revision {revision}"
        raise HubPushError(
            f"{label}: could not push {str(folder)!r} to {repo_id!r} at {api.endpoint}: "
            f"{type(err).__name__}: {err}\nThe model is saved locally in {str(folder)!r}; push it later with "
            f"`{retry}` (set HF_TOKEN, and HF_ENDPOINT for a mirror)."
        ) from err
    return str(getattr(info, "commit_url", info))
