"""bench.gpu_parity's mechanics on the CPU: the second copy of each model runs under another backend (the naive
oracles instead of the chunked torch forms), so the comparison is a real one; a perturbed copy is caught."""

import copy
import types

import pytest
import torch

from bench import gpu_parity
from bench.registry import load_entries


@pytest.mark.parametrize("name", ["mamba2", "rwkv6", "longformer_mlm"])
def test_naive_copy_agrees_with_the_torch_path(name):
    record = gpu_parity.check_entry(load_entries()[name], 64, 1, 48, 4, 0, device="cpu", backend="naive")
    assert record["logits"] < 1e-5 and record["grads_all"] < 1e-5
    assert record["grads_worst"][1] < 1e-4 and not record["grads_missing_on_one_side"]
    if name != "longformer_mlm":  # encoders do not decode
        assert record["decode_vs_full_forward"] < 1e-5
    else:
        assert "decode_vs_full_forward" not in record


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
