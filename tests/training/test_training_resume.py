"""Exact resume: a run stopped after a checkpoint and resumed ends bitwise equal to an uninterrupted one (CPU), for
every registered architecture in-process, and with a real SIGKILL at an arbitrary moment (mid-step or mid-save)
in separate processes for the baseline with dropout: the kill exercises the trainer's atomic saves and the
restored random states, which do not depend on the architecture (what does, the model's own state, is what the
in-process test checks for each)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig

import zoo
from tests.models.tiny_configs import TINY

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 24

# The killed run goes through the same loop with a pause after every step, so that SIGKILL lands mid-run.
SLOW_RUN = """
import sys, time
from zoo.training import load_recipe
from zoo.training.loop import Hooks, train
train(load_recipe(sys.argv[1], flags={"output_dir": sys.argv[2]}), Hooks(on_step_end=lambda step: time.sleep(0.1)))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _recipe(tmp_path: Path, model_type: str, max_steps: int = MAX_STEPS) -> Path:
    model = {"type": model_type, **TINY[model_type]}
    # Dropout draws random numbers every step: the resumed run must restore the RNG states exactly.
    if hasattr(AutoConfig.for_model(model_type), "attention_dropout"):
        model["attention_dropout"] = 0.1
    raw = {
        "model": model,
        "data": {"train": "synthetic:copy", "synthetic": {"n": 100}, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "training": {"max_steps": max_steps, "batch_size": 2, "grad_accum": 2, "block_size": 64},
        "logging": {"every": 5, "progress_bar": False, "tensorboard": False, "sample_tokens": 4},
        "checkpointing": {"every": 3, "keep_last": 2},
        "eval": {"every": 8, "max_batches": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _complete_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return [
        p for p in root.iterdir() if p.name.startswith("checkpoint-") and (p / "zoo_checkpoint.json").exists()
    ]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("model_type", sorted(zoo.REGISTRY))
def test_stop_then_resume_is_bitwise_identical(tmp_path, model_type):
    from zoo.training import load_recipe
    from zoo.training.loop import Hooks, train

    recipe = _recipe(tmp_path, model_type, max_steps=9)
    train(load_recipe(recipe, flags={"output_dir": str(tmp_path / "full")}))

    def stop(step):
        if step == 7:  # one step past the checkpoint at 6: that step is lost and done again
            raise _Stop

    stopped = tmp_path / "stopped"
    with pytest.raises(_Stop):
        train(load_recipe(recipe, flags={"output_dir": str(stopped)}), Hooks(on_step_end=stop))
    assert not (stopped / "model.safetensors").exists()
    assert sorted(p.name for p in _complete_checkpoints(stopped))[-1] == "checkpoint-00000006"
    steps = []
    train(load_recipe(recipe, flags={"output_dir": str(stopped)}), Hooks(on_step_end=steps.append))
    assert steps == [7, 8, 9], "the second run goes on from the checkpoint at step 6"

    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("model_type", ["zoo_transformer"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, model_type):
    recipe = _recipe(tmp_path, model_type)
    # The uninterrupted reference run and the run to be killed go side by side.
    full_cmd = [sys.executable, "train.py", "--config", str(recipe), "--output_dir", str(tmp_path / "full")]
    full = subprocess.Popen(
        full_cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed_dir = tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(recipe), str(killed_dir)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not _complete_checkpoints(killed_dir) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # Kill at an arbitrary moment after the first checkpoint: between steps, mid-step or mid-save.
    time.sleep(random.Random().uniform(0.0, 0.6))
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "model.safetensors").exists()
    done_before = sorted(p.name for p in _complete_checkpoints(killed_dir))
    assert done_before and f"checkpoint-{MAX_STEPS:08d}" not in done_before

    resumed = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            str(recipe),
            "--output_dir",
            str(killed_dir),
            "--resume",
            "auto",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {killed_dir / 'checkpoints' / done_before[-1]}" in resumed.stdout
    full_out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, full_out

    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(killed_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert not list((killed_dir / "checkpoints").glob(".tmp-*")), "interrupted saves are cleaned up"
    # The metrics log holds each step once, whatever the killed run had logged past its checkpoint.
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [
        s
        for s, line in zip(steps, (killed_dir / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in line
    ]
    assert train_steps == sorted(set(train_steps)), train_steps
