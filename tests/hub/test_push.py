"""``python -m zoo.hub push``: what is created and uploaded at the ``HfApi`` boundary, without network."""

from __future__ import annotations

import huggingface_hub
import pytest

from zoo.hub import push as push_module
from zoo.hub.__main__ import main
from zoo.hub.push import HubPushError, files_to_upload, push_folder


class FakeApi:
    """Records the calls ``push_folder`` makes; ``fail`` raises on create_repo like a machine without network."""

    endpoint = "https://hub.example"
    instances: list[FakeApi] = []

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail
        FakeApi.instances.append(self)

    def create_repo(self, **kwargs):
        if self.fail:
            raise ConnectionError("network is unreachable")
        self.calls.append(("create_repo", kwargs))

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": "https://hub.example/me/m/commit/abc"})()


@pytest.fixture
def folder(tmp_path):
    model = tmp_path / "model"
    (model / "checkpoints" / "step-2").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "README.md", "modeling_zoo_retnet.py"):
        (model / name).write_text("{}")
    (model / "checkpoints" / "step-2" / "state.pt").write_text("x")
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "a.pyc").write_text("x")
    return model


def test_push_creates_the_repo_and_uploads_the_folder(folder):
    api = FakeApi()
    url = push_folder(folder, "me/m", private=True, revision="v1", commit_message="first", api=api)
    assert url == "https://hub.example/me/m/commit/abc"
    (create, create_kw), (branch, branch_kw), (upload, upload_kw) = api.calls
    assert (create, branch, upload) == ("create_repo", "create_branch", "upload_folder")
    assert create_kw == {"repo_id": "me/m", "private": True, "exist_ok": True, "repo_type": "model"}
    assert branch_kw == {"repo_id": "me/m", "branch": "v1", "exist_ok": True, "repo_type": "model"}
    assert upload_kw["folder_path"] == str(folder) and upload_kw["revision"] == "v1"
    assert upload_kw["commit_message"] == "first" and upload_kw["repo_type"] == "model"
    assert "checkpoints/**" in upload_kw["ignore_patterns"]


def test_push_without_revision_goes_to_main(folder):
    api = FakeApi()
    push_folder(folder, "me/m", private=False, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is False and api.calls[1][1]["revision"] is None


def test_dry_run_lists_files_and_calls_nothing(folder):
    api = FakeApi()
    files = push_folder(folder, "me/m", dry_run=True, api=api)
    assert files == ["README.md", "config.json", "model.safetensors", "modeling_zoo_retnet.py"]
    assert api.calls == [] and files_to_upload(folder) == files


def test_cli_push_and_dry_run(folder, monkeypatch, capsys):
    FakeApi.instances.clear()
    monkeypatch.setattr(push_module, "HfApi", FakeApi)
    assert main(["push", str(folder), "--repo-id", "me/m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would create me/m (public)" in out and "model.safetensors" in out and "state.pt" not in out
    assert FakeApi.instances == []
    assert main(["push", str(folder), "--repo-id", "me/m", "--private", "--revision", "dev"]) == 0
    (api,) = FakeApi.instances
    assert api.calls[0][1]["private"] is True and api.calls[2][1]["revision"] == "dev"
    assert "pushed" in capsys.readouterr().out


def test_failure_is_a_clear_message_and_keeps_the_folder(folder, monkeypatch, capsys):
    monkeypatch.setattr(push_module, "HfApi", lambda: FakeApi(fail=True))
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert main(["push", str(folder), "--repo-id", "me/m"]) == 4
    err = capsys.readouterr().err
    assert "could not push" in err and "network is unreachable" in err and "saved locally" in err
    assert f"python -m zoo.hub push {folder} --repo-id me/m" in err
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_bad_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        push_folder(tmp_path / "missing", "me/m", api=FakeApi())
    with pytest.raises(ValueError, match="no config.json"):
        push_folder(tmp_path, "me/m", api=FakeApi())


def test_hf_endpoint_is_honoured_and_unreachable_is_reported(folder, monkeypatch):
    """The real HfApi, pointed (as HF_ENDPOINT does) at a local port nothing listens on."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the test session sets it
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(HubPushError, match=r"(?s)at http://127\.0\.0\.1:9: .*Connect.*saved locally"):
        push_folder(folder, "me/m")
    assert (folder / "model.safetensors").is_file()
