"""bench.gpu_parity's mechanics on the CPU: the second copy of each model runs under another backend (the naive
oracles instead of the chunked torch forms), so the comparison is a real one; a perturbed copy is caught."""

import copy
import types

import pytest
import torch

from bench import gpu_parity
from bench.registry import load_entries


@pytest.mark.parametrize("name", ["mamba2", "rwkv6", "longformer_mlm", "hyena"])
def test_naive_copy_agrees_with_the_torch_path(name):
    record = gpu_parity.check_entry(load_entries()[name], 64, 1, 48, 4, 0, device="cpu", backend="naive")
    assert record["logits"] < 1e-5 and record["grads_all"] < 1e-5
    assert record["grads_worst"][1] < 1e-4 and not record["grads_missing_on_one_side"]
    if name == "longformer_mlm":  # encoders do not decode
        assert "decode_vs_prefix_forward" not in record and "prepared_decode_vs_cpu" not in record
    elif name == "hyena":  # distilled decoding: the same on both sides after the same preparation
        assert record["prepared_decode_vs_cpu"] < 1e-5 and "decode_vs_prefix_forward" not in record
    else:
        assert record["decode_vs_prefix_forward"] < 1e-5


def test_a_different_copy_is_caught(monkeypatch):
    def perturbed(model):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.model.layers[0].mixer.out_proj.weight.mul_(1.05)
        return other

    monkeypatch.setattr(gpu_parity, "copy", types.SimpleNamespace(deepcopy=perturbed))
    record = gpu_parity.check_entry(load_entries()["mamba"], 64, 1, 32, 4, 0, device="cpu", backend="naive")
    assert record["logits"] > 1e-3 and record["grads_all"] > 1e-3
    assert record["grads_worst"][1] > 1e-3


def test_device_dependent_entry_is_judged_against_transformers_class(tmp_path, capsys):
    """reformer_transformers hashes with rotations drawn on the device, so its pass mark is zoo against
    transformers' Reformer on the same device; mamba is judged on both comparisons, and against its reference."""
    import json

    out = tmp_path / "parity.json"
    argv = ["--device", "cpu", "--backend", "naive", "--entries", "reformer_transformers", "mamba",
            "--hidden-size", "64", "--layers", "1", "--length", "96", "--decode-steps", "3", "--out", str(out)]
    assert gpu_parity.main(argv) == 0
    records = json.loads(out.read_text())["entries"]
    assert "cpu_comparison_not_counted" in records["reformer_transformers"]
    assert "cpu_comparison_not_counted" not in records["mamba"]
    for record in records.values():
        assert record["passed"] and record["reference_on_gpu"] < 1e-4
    assert "2/2 entries within 0.01" in capsys.readouterr().out


def test_backend_variable_is_restored(monkeypatch):
    monkeypatch.setenv("ZOO_BACKEND", "torch")
    with gpu_parity._backend("naive"):
        import os

        assert os.environ["ZOO_BACKEND"] == "naive"
    assert os.environ["ZOO_BACKEND"] == "torch"


def test_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_parity.main(["--entries", "mamba"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
