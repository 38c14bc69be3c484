"""Where a training step's time goes: GEMMs, the sequence-mixing op, the rest (``torch.profiler``, CPU time).

One profiled step (after an untimed one). The forward of every sequence-mixing module (the entry's ``mixers``) runs
inside a ``record_function`` range; the backward nodes created there are found by their sequence numbers, which
autograd gives a forward op and the backward node it creates. Each profiler event's *self* time then goes to

* ``gemm``: matrix products of projections and MLPs (``mm``, ``addmm``, ``bmm``, ... outside the mixers; ``mm`` /
  ``addmm`` inside them, i.e. the mixers' own linear projections);
* ``mixing``: every other op inside a mixer's forward or its backward nodes (attention, scans, chunked products,
  convolutions, FFTs, and their elementwise work);
* ``rest``: everything else (norms, activations, embedding, loss, optimiser-free autograd bookkeeping).

Shares are of the summed self CPU time; with two threads a GPU-less profile is indicative (profiling adds a few
microseconds per op, which weighs on models made of many small ops).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIXING_RANGE = "zoo::sequence_mixing"
GEMM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addbmm",
    "aten::_addmm_activation",
}
PROJECTION_OPS = {"aten::mm", "aten::addmm", "aten::_addmm_activation"}


def _mark_mixers(model: torch.nn.Module, mixers: tuple[str, ...]) -> list:
    handles = []
    for module in model.modules():
        if type(module).__name__ in mixers:
            ranges: list = []

            def pre(_m, _args, ranges=ranges):
                ranges.append(torch.profiler.record_function(MIXING_RANGE))
                ranges[-1].__enter__()

            def post(_m, _args, _out, ranges=ranges):
                ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _classify(events) -> dict[str, float]:
    by_id = {id(e): e for e in events}
    mixing_seq: set[int] = set()

    def under_mixing_range(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name == MIXING_RANGE:
                return True
            p = p.cpu_parent
        return False

    for e in events:
        seq = getattr(e, "sequence_nr", -1)
        if seq is not None and seq >= 0 and not e.name.startswith("autograd::") and under_mixing_range(e):
            mixing_seq.add(seq)

    def in_mixing(e) -> bool:
        p = e
        while p is not None:
            if p.name == MIXING_RANGE:
                return True
            if p.name.startswith("autograd::engine::evaluate_function") and p.sequence_nr in mixing_seq:
                return True
            p = p.cpu_parent
        return False

    totals = {"gemm": 0.0, "mixing": 0.0, "rest": 0.0}
    for e in by_id.values():
        inside = in_mixing(e)
        if e.name in GEMM_OPS and (not inside or e.name in PROJECTION_OPS):
            key = "gemm"
        elif inside:
            key = "mixing"
        else:
            key = "rest"
        totals[key] += e.self_cpu_time_total
    return totals


def time_split(step: Callable[[], None], model: torch.nn.Module, mixers: tuple[str, ...]) -> dict:
    """Shares of one ``step()``'s self CPU time: gemm, mixing, rest (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # untimed: one-off allocations and kernel selection
    handles = _mark_mixers(model, mixers)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for h in handles:
            h.remove()
    totals = _classify(prof.events())
    whole = sum(totals.values()) or 1.0
    return {
        "share": {k: v / whole for k, v in totals.items()},
        "self_cpu_ms": {k: v / 1e3 for k, v in totals.items()},
        "mixers": list(mixers),
        "method": "torch.profiler self CPU time of one training step; see bench/timesplit.py",
    }


__all__ = ["time_split"]
