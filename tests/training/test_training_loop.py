"""The loop in-process: the final folder, logging, divergence, LoRA and Hub push."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import zoo  # noqa: F401
from zoo.data.tokenizer import default_tokenizer
from zoo.models import default_lora_targets
from zoo.training import load_recipe, train
from zoo.training.cli import EXIT_DIVERGED, EXIT_PUSH_FAILED, main
from zoo.training.loop import Hooks, TrainingDiverged, resolve_mixed_precision

TINY_MODEL = {
    "type": "zoo_transformer",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


def write_recipe(tmp_path: Path, **sections) -> Path:
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"train": "synthetic:copy", "synthetic": {"n": 200}, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3},
        "training": {"max_steps": 6, "batch_size": 2, "block_size": 64, "output_dir": str(tmp_path / "out")},
        "logging": {"every": 2, "progress_bar": False, "sample_tokens": 8},
        "checkpointing": {"every": 2, "keep_last": 2},
        "eval": {"every": 4, "max_batches": 2},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_end_to_end(tmp_path, capsys):
    recipe = load_recipe(write_recipe(tmp_path, training={"grad_accum": 2}))
    metrics = train(recipe)
    out = tmp_path / "out"
    # The final folder loads with the Auto classes after `import zoo`, with its tokenizer.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "zoo_transformer" and (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin")) and len(AutoTokenizer.from_pretrained(out)) == 259
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["grad_accum"] == 2
    assert (out / "README.md").exists() and json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "checkpoint-00000004",
        "checkpoint-00000006",
    ]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard event files"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [2, 4, 6]
    assert any("val_loss" in r for r in logged)
    assert metrics["val_loss"] > 0 and metrics["tokens"] == 6 * 2 * 2 * 64
    printed = capsys.readouterr().out
    assert (
        "sample (greedy): 'The ' ->" in printed
        and "validation loss" in printed
        and "unigram entropy" in printed
    )
    assert "done: 6 steps" in printed


def test_nan_loss_stops_without_saving_over_the_last_checkpoint(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))

    def poison(step, micro, loss):
        return loss * float("nan") if step == 4 else loss

    with pytest.raises(
        TrainingDiverged, match=r"training loss is not finite \(nan\) at step 5.*checkpoint-00000004"
    ):
        train(recipe, Hooks(on_loss=poison))
    out = tmp_path / "out"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert not (out / "model.safetensors").exists()


def test_exploding_lr_exits_with_a_clear_message(tmp_path, capsys):
    path = write_recipe(tmp_path, optim={"lr": 1e30, "max_grad_norm": None}, schedule={"name": "constant"})
    assert main(["--config", str(path)]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "training diverged" in err and "not finite" in err and "optim.lr" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_lora_finetune_merge_and_reload_adapter(tmp_path):
    base_dir = tmp_path / "base"
    config = AutoConfig.for_model(
        **{"model_type": TINY_MODEL["type"], **{k: v for k, v in TINY_MODEL.items() if k != "type"}}
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    default_tokenizer().save_pretrained(base_dir)
    path = write_recipe(tmp_path, finetune={"method": "lora", "r": 4, "alpha": 8}, optim={"lr": 1e-2})
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"pretrained": str(base_dir)}
    path.write_text(yaml.safe_dump(raw))
    train(load_recipe(path))

    out = tmp_path / "out"
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # The architecture's registered defaults.
    assert sorted(adapter_config["target_modules"]) == sorted(default_lora_targets("zoo_transformer"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    x = torch.randint(3, 259, (2, 16))
    with torch.no_grad():
        base_logits = base(input_ids=x).logits
        merged_logits = merged(input_ids=x).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
        adapter_logits = adapted(input_ids=x).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-4), "the adapter changed the model"
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)


def test_hub_push_uploads_the_final_folder(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.setdefault("create", kw))
    # the trainer uploads a temporary export of the final folder: list its files while it exists
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: calls.setdefault("upload", {**kw, "files": sorted(os.listdir(kw["folder_path"]))}),
    )
    path = write_recipe(tmp_path, hub={"push": True, "repo_id": "me/zoo-tiny"}, training={"max_steps": 2})
    assert main(["--config", str(path)]) == 0
    assert calls["create"]["repo_id"] == "me/zoo-tiny" and calls["create"]["exist_ok"]
    upload = calls["upload"]
    assert upload["repo_id"] == "me/zoo-tiny"
    assert Path(upload["folder_path"]).parent.parent == tmp_path / "out"
    assert {"model.safetensors", "modeling_zoo_transformer.py", "README.md"} <= set(upload["files"])
    assert "checkpoints/**" in upload["ignore_patterns"]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_hub_push_failure_keeps_the_local_save(tmp_path, monkeypatch, capsys):
    def offline(self, **kw):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    path = write_recipe(tmp_path, hub={"push": True, "repo_id": "me/zoo-tiny"}, training={"max_steps": 2})
    assert main(["--config", str(path)]) == EXIT_PUSH_FAILED
    err = capsys.readouterr().err
    assert "hub.push: could not push" in err and "network is unreachable" in err and "saved locally" in err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None


def test_gradient_checkpointing_and_compile_switches(tmp_path, monkeypatch):
    # Inductor needs minutes to compile on a CPU; the eager backend exercises the same wrapping in seconds.
    compiled, checkpointed = [], []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or real_compile(m, backend="eager"))
    real_enable = PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(
        PreTrainedModel,
        "activation_checkpointing_enable",
        lambda self, **kw: checkpointed.append(kw) or real_enable(self, **kw),
    )
    path = write_recipe(tmp_path, training={"max_steps": 2, "compile": True, "gradient_checkpointing": True})
    train(load_recipe(path))
    assert compiled and checkpointed
    out = tmp_path / "out"
    assert not any(k.startswith("_orig_mod.") for k in load_file(out / "model.safetensors"))
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "zoo_transformer"


def test_mixed_precision_resolution(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    expected = (
        "no" if not torch.cuda.is_available() else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    )
    assert resolve_mixed_precision("auto") == expected
    assert resolve_mixed_precision("bf16") == "bf16"
    # Under `accelerate launch --mixed_precision bf16`, auto defers to the launcher.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision("auto") is None


def test_bf16_autocast_on_cpu(tmp_path):
    metrics = train(load_recipe(write_recipe(tmp_path, training={"max_steps": 2, "mixed_precision": "bf16"})))
    assert math.isfinite(metrics["val_loss"])
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values()), "master weights stay fp32"


def test_randomized_positions_option(tmp_path, monkeypatch):
    from zoo.training.loop import randomized_batch_positions
    from zoo.training.recipe import RecipeError

    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    a = randomized_batch_positions(packed, 64, seed=0, step=3, micro=0, rank=0)
    assert torch.equal(a, randomized_batch_positions(packed, 64, seed=0, step=3, micro=0, rank=0))
    assert not torch.equal(a, randomized_batch_positions(packed, 64, seed=0, step=4, micro=0, rank=0))
    assert a[0, 0] == 0 and a[0, 4] == 0 and a.max() < 64

    with pytest.raises(RecipeError, match="training.randomized_positions"):
        load_recipe(write_recipe(tmp_path, training={"randomized_positions": 10}))

    seen = []
    original = zoo.models.transformer.TransformerForCausalLM.forward

    def spy(self, *args, **kwargs):
        if self.training and kwargs.get("position_ids") is not None:
            seen.append(int(kwargs["position_ids"].max()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zoo.models.transformer.TransformerForCausalLM, "forward", spy)
    train(load_recipe(write_recipe(tmp_path, training={"randomized_positions": 1024, "max_steps": 3})))
    assert seen and max(seen) > 64, "training saw positions past the block length"


def test_lora_default_targets_follow_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.training.lora import apply_lora, default_target_modules
    from zoo.training.recipe import FinetuneConfig, RecipeError

    def llama():
        config = LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        return LlamaForCausalLM(config)

    # peft knows Llama: its own table decides, not a copy of it here.
    assert default_target_modules(llama()) is None
    adapted = apply_lora(llama(), FinetuneConfig(method="lora", r=2))
    assert adapted.peft_config["default"].target_modules == set(PEFT_TARGETS["llama"])
    with pytest.raises(RecipeError, match=r"finetune.target_modules: .*nothing_like_this"):
        apply_lora(llama(), FinetuneConfig(method="lora", target_modules=["nothing_like_this"]))
