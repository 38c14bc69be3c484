"""Several CPU processes over gloo: DDP follows the loss trajectory of one process with grad_accum 2; FSDP2 shards,
samples on every process, and resumes from its sharded checkpoints exactly."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_two_processes_match_one_process_with_grad_accum(tmp_path):
    raw = {
        "model": {
            "type": "zoo_transformer",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "data": {"train": "synthetic:copy", "synthetic": {"n": 100}, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3},
        "training": {"max_steps": 8, "batch_size": 2, "block_size": 64},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False, "sample_tokens": 4},
        "checkpointing": {"every": 4},
        "eval": {"every": 4, "max_batches": 2},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/cpu.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "train.py",
        "--config",
        str(recipe),
        "--output_dir",
        str(tmp_path / "two"),
    ]
    single = [
        sys.executable,
        "train.py",
        "--config",
        str(recipe),
        "--output_dir",
        str(tmp_path / "one"),
        "training.grad_accum=2",
    ]
    two = subprocess.Popen(
        launch, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    one = subprocess.run(single, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    two_out, _ = two.communicate(timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two_out
    assert "2 process(es)" in two_out and "1 process(es)" in one.stdout

    one_losses, two_losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 8
    assert one_losses[-1] < one_losses[0]
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    a, b = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    # Every process saved its own RNG state into the shared checkpoint.
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-00000008" / "random_states_1.pkl").exists()


def _launch(config_file: str, recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    cmd += [
        "--main_process_port",
        str(_free_port()),
        "train.py",
        "--config",
        str(recipe),
        "--output_dir",
        str(out),
    ]
    return subprocess.Popen(
        [*cmd, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(run: subprocess.Popen) -> str:
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    return out


@pytest.mark.skipif(
    torch.accelerator.is_available(),
    reason="fsdp_cpu.yaml is for machines without an accelerator (see fsdp.yaml)",
)
def test_fsdp_on_two_cpu_processes_samples_and_resumes_exactly(tmp_path):
    raw = {
        "model": {
            "type": "zoo_transformer",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "data": {"train": "synthetic:copy", "synthetic": {"n": 100}, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3},
        # Independent of max_steps, so that a run stopped at step 3 and continued to 6 sees the same rates.
        "schedule": {"name": "constant", "warmup_steps": 2},
        "training": {"max_steps": 6, "batch_size": 2, "block_size": 64},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False, "sample_tokens": 4},
        "checkpointing": {"every": 3},
        "eval": {"every": 0, "max_batches": 2},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    config = "configs/accelerate/fsdp_cpu.yaml"
    # The reference run and the first half of the interrupted one go side by side.
    full = _launch(config, recipe, tmp_path / "full")
    part = _launch(config, recipe, tmp_path / "resumed", "--max_steps", "3")
    full_out, _ = _finish(full), _finish(part)
    # Sharded for real: two processes, and the checkpoint holds the model as distributed-checkpoint shards.
    assert "2 process(es)" in full_out
    assert (tmp_path / "full" / "checkpoints" / "checkpoint-00000006" / "pytorch_model_fsdp_0").is_dir()
    # The greedy sample's forwards gather shards from both processes: rank 0 alone would hang (NCCL) or lose
    # its peer (gloo), after the final save and before the Hub push.
    assert "sample (greedy): 'The ' ->" in full_out

    rest_out = _finish(_launch(config, recipe, tmp_path / "resumed"))
    assert "checkpoint-00000003 at step 3" in rest_out

    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
