"""``python -m zoo.hub push`` and the trainer's ``hub.push``: what is created and uploaded at the ``HfApi`` boundary,
without network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from zoo.hub import push as push_module
from zoo.hub.__main__ import main
from zoo.hub.export import export
from zoo.hub.push import HubPushError, files_to_upload, push_folder, push_model


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


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A finished run's folder as the trainer leaves it: weights, tokenizer, recipe, card, checkpoints."""
    import types

    from transformers import AutoModelForCausalLM

    from tests.models.tiny_configs import tiny_config
    from zoo.data.tokenizer import default_tokenizer
    from zoo.hub import write_model_card

    folder = tmp_path_factory.mktemp("run") / "out"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("zoo_retnet")).eval()
    model.save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    (folder / "recipe.yaml").write_text("model: {type: zoo_retnet}\n")
    recipe = types.SimpleNamespace(
        hub=types.SimpleNamespace(repo_id="me/zoo-retnet-tiny"), data=types.SimpleNamespace(train="default")
    )
    write_model_card(folder, recipe, {"steps": 2, "val_loss": 5.0})
    (folder / "checkpoints" / "checkpoint-00000002").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-00000002" / "optimizer.bin").write_text("x")
    return folder, model


def _contents(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _tree(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*"))


def test_trainer_push_uploads_the_export(trained_folder, tmp_path, monkeypatch):
    """``hub.push`` uploads what ``python -m zoo.hub export`` writes: flattened code with ``auto_map``, weights,
    tokenizer, card and requirements; the run's folder is left as it was."""
    from zoo.training.push import push_folder as trainer_push
    from zoo.training.recipe import HubConfig

    folder, _ = trained_folder
    before = _tree(folder)
    seen = {}

    def upload_folder(self, **kwargs):
        path = Path(kwargs["folder_path"])
        seen["kwargs"] = kwargs
        seen["files"] = files_to_upload(path, kwargs["ignore_patterns"])
        seen["config"] = json.loads((path / "config.json").read_text())
        seen["card"] = ModelCard.load(path / "README.md")
        seen["requirements"] = (path / "requirements.txt").read_text()
        shutil.copytree(path, uploaded)
        return type("CommitInfo", (), {"commit_url": "https://hub.example/me/zoo-retnet-tiny/commit/1"})()

    created = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: created.append(kw))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    uploaded = tmp_path / "uploaded"
    cfg = HubConfig(push=True, repo_id="me/zoo-retnet-tiny", private=True, commit_message="tiny")
    assert trainer_push(folder, cfg) == "https://hub.example/me/zoo-retnet-tiny/commit/1"

    assert created == [
        {"repo_id": "me/zoo-retnet-tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    kwargs = seen["kwargs"]
    assert kwargs["repo_id"] == "me/zoo-retnet-tiny" and kwargs["commit_message"] == "tiny"
    assert kwargs["revision"] is None and kwargs["repo_type"] == "model"
    files = set(seen["files"])
    assert {"config.json", "model.safetensors", "README.md", "requirements.txt", "recipe.yaml"} <= files
    assert "tokenizer_config.json" in files  # the byte tokenizer is defined by its config alone
    assert {
        "modeling_zoo_retnet.py",
        "zoo_models_retnet_modeling_retnet.py",
        "zoo_ops_retention_chunk.py",
    } <= files
    assert not any(f.startswith("checkpoints/") or "/" in f for f in files), files
    assert seen["config"]["auto_map"]["AutoModelForCausalLM"] == "modeling_zoo_retnet.RetNetForCausalLM"
    # the very folder `python -m zoo.hub export` writes (whose loading without zoo test_export.py checks)
    direct = export(folder, tmp_path / "direct")
    assert _contents(uploaded) == _contents(direct)
    card = seen["card"]
    assert "custom_code" in card.data.tags
    assert 'from_pretrained("me/zoo-retnet-tiny", trust_remote_code=True)' in card.text
    assert "import zoo" not in card.text.split("<!-- zoo:load -->")[1].split("<!-- /zoo:load -->")[0]
    assert seen["requirements"].splitlines()[1].startswith("torch>=")
    # the export lived in a temporary folder; the run's folder is as it was
    assert _tree(folder) == before


def test_trainer_push_failure_keeps_the_run_and_says_how_to_retry(trained_folder, monkeypatch):
    from zoo.training.push import push_folder as trainer_push
    from zoo.training.recipe import HubConfig

    folder, _ = trained_folder
    before = _tree(folder)

    def offline(self, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(HubPushError) as err:
        trainer_push(folder, HubConfig(push=True, repo_id="me/zoo-retnet-tiny"))
    message = str(err.value)
    assert message.startswith("hub.push: could not push") and "network is unreachable" in message
    assert f"saved locally in {str(folder)!r}" in message
    exported = folder.parent / "out-export"
    assert f"python -m zoo.hub export {folder} {exported} && python -m zoo.hub push {exported}" in message
    assert _tree(folder) == before


def test_push_model_of_a_transformers_architecture_uploads_it_as_it_is(tmp_path):
    """A model the trainer fine-tuned from transformers (not a zoo architecture) needs no remote code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    before = _tree(tmp_path / "llama")
    api = FakeApi()
    push_model(tmp_path / "llama", "me/llama", api=api)
    (_, upload_kw) = api.calls[-1]
    assert upload_kw["folder_path"] == str(tmp_path / "llama")
    assert _tree(tmp_path / "llama") == before and not any(
        p.suffix == ".py" for p in (tmp_path / "llama").iterdir()
    )


def test_push_model_export_failure_is_a_push_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "zoo_retnet"}))
    api = FakeApi()
    with pytest.raises(
        HubPushError, match=r"(?s)could not export .*no \*\.safetensors.*nothing was uploaded"
    ):
        push_model(tmp_path / "m", "me/m", api=api)
    assert api.calls == [] and sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json"]
