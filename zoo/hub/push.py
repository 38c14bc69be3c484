"""Upload a model folder to the Hugging Face Hub: ``create_repo`` then ``upload_folder``.

One implementation for ``python -m zoo.hub push`` and the trainer's ``hub.push``. ``push_folder`` uploads a folder as
it is; ``push_model`` (the trainer's) first exports a saved zoo model into a temporary folder with its modeling code
(``zoo.hub.export``), so that what lands on the Hub loads with ``trust_remote_code=True`` where zoo is not
installed. ``HF_ENDPOINT`` (a mirror or a private Hub) and ``HF_TOKEN`` are read by ``huggingface_hub`` itself.
Pushing only reads the model folder, so a failure (no network, no token, no permission) loses nothing local: it
raises :class:`HubPushError` saying where the model is and how to push it later.
"""

from __future__ import annotations

import json
import tempfile
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


def _check_model_folder(folder: Path, label: str) -> None:
    if not folder.is_dir():
        raise ValueError(f"{label}: folder {str(folder)!r} does not exist or is not a directory")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{label}: {str(folder)!r} has no config.json; push a model folder (saved or exported)"
        )


def _retry_flags(repo_id: str, revision: str | None) -> str:
    return f"--repo-id {repo_id}" + (f" --revision {revision}" if revision is not None else "")


def _upload(
    api: HfApi,
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    commit_message: str,
    label: str,
    saved: Path,
    retry: str,
) -> str:
    """``create_repo`` (+ ``create_branch``) and ``upload_folder``; any failure becomes a :class:`HubPushError`
    naming ``saved`` (the local model) and the ``retry`` command."""
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
        raise HubPushError(
            f"{label}: could not push {str(saved)!r} to {repo_id!r} at {api.endpoint}: "
            f"{type(err).__name__}: {err}\nThe model is saved locally in {str(saved)!r}; push it later with "
            f"`{retry}` (set HF_TOKEN, and HF_ENDPOINT for a mirror)."
        ) from err
    return str(getattr(info, "commit_url", info))


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
    _check_model_folder(folder, label)
    if dry_run:
        return files_to_upload(folder)
    retry = f"python -m zoo.hub push {folder} {_retry_flags(repo_id, revision)}"
    return _upload(
        api or HfApi(),
        folder,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        label=label,
        saved=folder,
        retry=retry,
    )


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str = COMMIT_MESSAGE,
    api: HfApi | None = None,
    label: str = "zoo.hub push",
) -> str:
    """Push the saved model in ``model_dir`` as ``python -m zoo.hub export`` would write it: its weights,
    tokenizer, card, ``requirements.txt`` and flattened modeling code (``auto_map`` in ``config.json``), exported
    into a temporary folder inside ``model_dir`` (removed afterwards; ``.tmp-*`` is never uploaded). A model that
    is not a zoo architecture (e.g. a transformers model fine-tuned by the trainer) needs no remote code and is
    pushed as it is. Returns the commit URL; raises :class:`HubPushError` if the export or the upload fails."""
    import zoo
    from zoo.hub.export import export

    model_dir = Path(model_dir)
    _check_model_folder(model_dir, label)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type not in zoo.REGISTRY:
        return push_folder(
            model_dir,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            api=api,
            label=label,
        )
    exported = model_dir.parent / f"{model_dir.name}-export"
    retry = (
        f"python -m zoo.hub export {model_dir} {exported} && "
        f"python -m zoo.hub push {exported} {_retry_flags(repo_id, revision)}"
    )
    with tempfile.TemporaryDirectory(prefix=".tmp-hub-export-", dir=model_dir) as tmp:
        try:
            folder = export(model_dir, Path(tmp) / "export")
        except Exception as err:
            raise HubPushError(
                f"{label}: could not export {str(model_dir)!r} for the Hub: {type(err).__name__}: {err}\n"
                f"The model is saved locally in {str(model_dir)!r}; nothing was uploaded."
            ) from err
        return _upload(
            api or HfApi(),
            folder,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            label=label,
            saved=model_dir,
            retry=retry,
        )
