"""Atomic, rotating training checkpoints on top of ``Accelerator.save_state``.

Layout under ``output_dir/checkpoints/``::

    checkpoint-00000200/     complete: model, optimizer, scheduler, RNG states of every process, TrainState,
                             and ``zoo_checkpoint.json`` (written last)
    .tmp-checkpoint-00000300/   a save in progress (or one that a kill interrupted); never resumed from

A save writes everything into the ``.tmp-`` folder, flushes it to disk, then renames it into place: ``rename`` is
atomic on POSIX file systems, so a process killed at any instant leaves either the previous checkpoints or the
previous ones plus the new, complete one, never a half-written ``latest``. Only folders that carry the marker file
count as checkpoints. Afterwards the oldest complete checkpoints beyond ``keep_last`` are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "zoo_checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


class CheckpointManager:
    """Saves, lists, prunes and finds training checkpoints in ``root`` (usually ``output_dir/checkpoints``)."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir() and is_complete(path):
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def remove_incomplete(self) -> None:
        """Delete interrupted saves (``.tmp-*``, or a checkpoint folder without its marker)."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.is_dir() and (
                path.name.startswith(".tmp-") or (_NAME.match(path.name) and not is_complete(path))
            ):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, accelerator, step: int, info: dict | None = None) -> Path:
        """Save the full training state after optimizer step ``step``; call on every process."""
        final = self.root / f"checkpoint-{step:08d}"
        tmp = self.root / f".tmp-checkpoint-{step:08d}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / MARKER).write_text(json.dumps({"step": step, **(info or {})}, indent=2))
            _fsync_tree(tmp)
            if final.exists():
                # Only when re-saving a step that already has a checkpoint (a resumed run that ends at it).
                stale = self.root / f".tmp-stale-{step:08d}"
                final.rename(stale)
                shutil.rmtree(stale)
            tmp.rename(final)
            _fsync_dir(self.root)
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (0 keeps all)."""
        if self.keep_last <= 0:
            return
        done = self.complete()
        for path in done[: max(len(done) - self.keep_last, 0)]:
            # Rename first so that a kill during rmtree never leaves a marker-carrying half folder.
            doomed = path.with_name(".tmp-removing-" + path.name)
            path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def resolve_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from for ``checkpointing.resume`` = ``auto`` | ``none`` | a folder."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume).expanduser()
        if not is_complete(path):
            raise ValueError(f"checkpointing.resume: {resume!r} is not a complete checkpoint (no {MARKER})")
        return path
