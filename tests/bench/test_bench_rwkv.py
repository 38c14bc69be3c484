"""The RWKV entries against BlinkDL's ``rwkv`` package (bench/entries/rwkv.py): the adapter runs the package on a
zoo model's weights in this process (RWKV-7's class included), agrees with zoo's forward, decodes through the
suite's cache interface, and the suite times prefill and decoding of both at tiny sizes (no training step: the
package has no backward). Timings are not asserted. Peng et al. 2023/2024/2025 (arXiv:2305.13048, 2404.05892,
2503.14456)."""

from __future__ import annotations

import pytest
import torch

from bench.registry import load_entries


@pytest.fixture
def package_env(monkeypatch):
    """The package reads these from the environment; restored after the test."""
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    monkeypatch.setenv("RWKV_JIT_ON", "1")
    monkeypatch.delenv("RWKV_V7_ON", raising=False)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("version", [4, 6, 7])
def test_package_adapter_agrees_and_decodes(version, package_env):
    """The package's sequence mode, then its RNN mode through the cache, against zoo's full forward."""
    from zoo.models.utils import CACHE_NAME, output_cache

    entry = load_entries()[f"rwkv{version}_package"]
    assert entry.reference.same_weights and "train" not in entry.workloads

    torch.manual_seed(version)
    model = entry.make(64, 2, 64).eval()
    package = entry.reference.build(model).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 21))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    out = package(input_ids=ids[:, :13], use_cache=True)
    steps = [out.logits]
    for t in range(13, 21):
        out = package(input_ids=ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: output_cache(out)})
        steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full) < 1e-4
    with pytest.raises(ValueError, match="no backward"):
        package(input_ids=ids, labels=ids)


def test_suite_times_the_package_entry(package_env):
    """RWKV-7 (the package's class picked at import) through the suite: logits checked, prefill and decoding of
    both timed, no training row."""
    from bench.flops import peak_matmul_flops
    from bench.suite import SuiteConfig, run_entry

    entry = load_entries()["rwkv7_package"]
    cfg = SuiteConfig(
        hidden_size=64, layers=1, lengths=[16], decode_contexts=[8], decode_steps=2, repeats=1,
        memory="off", profile_length=None,
    )  # fmt: skip
    result = run_entry(
        entry, cfg, "cpu", torch.float32, peak_matmul_flops(size=32, repeats=1), lambda _: None
    )
    assert "error" not in result, result.get("error")
    assert result["reference"]["logits_check"]["passed"]
    assert result["prefill"][0]["reference_over_zoo_median"] > 0
    assert [d["context"] for d in result["decode"]["reference"]] == [8]
    assert "train" not in result
