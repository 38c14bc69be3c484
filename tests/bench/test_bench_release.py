"""The suite's workloads keep no step's outputs alive: each forward's outputs are freed by reference counting
before the next forward (the timed loops pause the cyclic GC, so anything kept, or caught in a cycle, would pile up
at long T), and none survives its workload. The prompt's logits are gone while decoding. Tiny sizes, no timing
asserted."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from bench.registry import load_entries
from bench.suite import (
    SuiteConfig,
    build_pair,
    release_memory,
    time_decode,
    time_prefill,
    time_training,
)


@pytest.fixture()
def gc_off():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if enabled:
        gc.enable()


def _watch(models: dict) -> tuple[list, list]:
    """Forward hooks on every model: ``outputs`` gets (tokens, weakref to the logits) of each forward; ``alive``
    gets, at each forward's start, the token counts of the earlier outputs still alive."""
    outputs: list[tuple[int, weakref.ref]] = []
    alive: list[tuple[int, list[int]]] = []

    def before(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        alive.append((ids.shape[1], [n for n, ref in outputs if ref() is not None]))

    def after(_module, _args, _kwargs, output):
        outputs.append((output.logits.shape[1], weakref.ref(output.logits)))

    for model in models.values():
        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True)
    return outputs, alive


def test_workloads_release_each_steps_outputs(gc_off):
    entry = load_entries()["transformer"]
    cfg = SuiteConfig(
        hidden_size=32, layers=1, lengths=[16, 32], repeats=2, warmup=1, decode_contexts=[8, 24],
        decode_steps=3, memory="off", profile_length=None, threads=1,
    )  # fmt: skip
    model, reference = build_pair(entry, cfg, 64, "cpu", torch.float32)
    models = {"zoo": model, "reference": reference}
    outputs, alive = _watch(models)
    quiet = lambda _text: None

    time_training(entry, models, cfg.lengths, cfg, "cpu", {"flops_per_s": 1e9}, quiet)
    n_train = len(outputs)
    # warm-up + interleaved repeats, both models, per length
    assert n_train == len(cfg.lengths) * 2 * (cfg.warmup + cfg.repeats)
    assert all(not earlier for _, earlier in alive), "a training step's outputs outlived it"
    assert all(ref() is None for _, ref in outputs)

    time_prefill(entry, models, cfg.lengths, cfg, "cpu", quiet)
    assert len(outputs) == n_train + len(cfg.lengths) * 2 * (1 + cfg.repeats)
    assert all(not earlier for _, earlier in alive), "a prefill's outputs outlived it"
    assert all(ref() is None for _, ref in outputs)

    n_before_decode = len(alive)
    time_decode(entry, models, cfg, "cpu", quiet)
    decode_calls = alive[n_before_decode:]
    # a prefill per context, then single-token steps (transformers' Llama, the reference here, is not decoded)
    assert sum(tokens > 1 for tokens, _ in decode_calls) == len(cfg.decode_contexts)
    for tokens, earlier in decode_calls:
        # the step being replaced may hold its one-token logits; never the prompt's logits at every position
        assert all(n == 1 for n in earlier) and len(earlier) <= 1, (tokens, earlier)
    assert all(ref() is None for _, ref in outputs)


def test_release_memory_reports_the_resident_set():
    record = release_memory()
    assert set(record) == {"rss_before_bytes", "rss_after_bytes"}
    for value in record.values():
        assert value is None or (isinstance(value, int) and value > 0)
