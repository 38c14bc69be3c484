"""Checkpoint folders: only complete ones count, rotation keeps the newest, resume finds the right one."""

import json
from pathlib import Path

import pytest

from zoo.training.checkpoint import MARKER, CheckpointManager


class FakeAccelerator:
    """Enough of Accelerator for CheckpointManager.save on one process."""

    is_main_process = True

    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        if self.fail_at is not None:
            raise KeyboardInterrupt("killed mid-save")


def test_save_rotate_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    assert manager.latest() is None and manager.resolve_resume("auto") is None
    for step in (5, 10, 15):
        manager.save(FakeAccelerator(), step, {"tokens": step})
    assert [p.name for p in manager.complete()] == ["checkpoint-00000010", "checkpoint-00000015"]
    assert json.loads((manager.latest() / MARKER).read_text()) == {"step": 15, "tokens": 15}
    assert manager.resolve_resume("auto") == manager.latest()
    assert manager.resolve_resume("none") is None
    assert manager.resolve_resume(str(manager.complete()[0])) == manager.complete()[0]


def test_interrupted_save_never_becomes_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    manager.save(FakeAccelerator(), 5)
    with pytest.raises(KeyboardInterrupt):
        manager.save(FakeAccelerator(fail_at=10), 10)
    # A folder with the final name but no marker (e.g. copied by hand) is not complete either.
    (manager.root / "checkpoint-00000020").mkdir()
    assert manager.latest().name == "checkpoint-00000005"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resolve_resume(str(manager.root / "checkpoint-00000020"))
    manager.remove_incomplete()
    assert sorted(p.name for p in manager.root.iterdir()) == ["checkpoint-00000005"]


def test_keep_last_zero_keeps_all(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=0)
    for step in range(1, 5):
        manager.save(FakeAccelerator(), step)
    assert len(manager.complete()) == 4
