"""Kernel-level comparisons on a CUDA GPU, bf16, forward + backward, against the libraries users would otherwise run,
each only when installed (otherwise the result says it was skipped):

* ``flash_attn``: ``flash_attn_func(causal=True)`` against PyTorch SDPA, which zoo's attention dispatches to;
* ``fla``: ``chunk_simple_gla`` (scalar-gated linear attention, the retention recurrence) against
  ``zoo.ops.retention.retention`` (Triton backend);
* ``mamba_ssm``: ``selective_scan_fn`` against ``zoo.ops.selective_scan.selective_scan`` (Triton backend).

Each is timed as the median of ``repeats`` synchronised runs after two untimed ones; the ratio is the library's time
over zoo's. Dao 2023 (FlashAttention-2, arXiv:2307.08691); Yang et al. 2024 (GLA, arXiv:2312.06635); Gu and Dao
2023 (arXiv:2312.00752).
"""

from __future__ import annotations

import statistics
import time

import torch

SHAPE = {"batch": 1, "seq_len": 8192, "heads": 8, "head_dim": 64, "channels": 1024, "state": 16}


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fwd_bwd(fn, *inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def _leaf(*shape, scale=1.0, dtype=torch.bfloat16):
    return (scale * torch.randn(*shape, device="cuda", dtype=dtype)).requires_grad_()


def _flash_attn(repeats: int) -> dict:
    from flash_attn import flash_attn_func

    B, T, H, D = SHAPE["batch"], SHAPE["seq_len"], SHAPE["heads"], SHAPE["head_dim"]
    q, k, v = (_leaf(B, T, H, D) for _ in range(3))
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    theirs = _time(_fwd_bwd(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v), repeats)
    ours = _time(_fwd_bwd(sdpa, q, k, v), repeats)
    return {"zoo_path": "torch SDPA", "zoo_s": ours, "library_s": theirs, "library_over_zoo": theirs / ours}


def _fla(repeats: int) -> dict:
    from fla.ops.simple_gla import chunk_simple_gla

    from zoo.ops.retention import retention

    B, T, H, D = SHAPE["batch"], SHAPE["seq_len"], SHAPE["heads"], SHAPE["head_dim"]
    q, k, v = (_leaf(B, T, H, D, scale=0.1) for _ in range(3))
    log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(H, device="cuda", dtype=torch.float32)))
    gates = log_gamma.expand(B, T, H).contiguous()
    theirs = _time(_fwd_bwd(lambda q, k, v: chunk_simple_gla(q, k, v, g=gates), q, k, v), repeats)
    ours = _time(_fwd_bwd(lambda q, k, v: retention(q, k, v, log_gamma, backend="triton"), q, k, v), repeats)
    return {
        "zoo_path": "zoo.ops.retention (triton)",
        "zoo_s": ours,
        "library_s": theirs,
        "library_over_zoo": theirs / ours,
    }


def _mamba_ssm(repeats: int) -> dict:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    from zoo.ops.selective_scan import selective_scan

    B, T, Dc, N = SHAPE["batch"], SHAPE["seq_len"], SHAPE["channels"], SHAPE["state"]
    x, dt, z = _leaf(B, T, Dc), _leaf(B, T, Dc, scale=0.5), _leaf(B, T, Dc)
    Bm, Cm = _leaf(B, T, N), _leaf(B, T, N)
    A = -torch.rand(Dc, N, device="cuda").add(0.5)
    D = torch.ones(Dc, device="cuda")
    theirs_fn = lambda x, dt, z, Bm, Cm: selective_scan_fn(
        x.transpose(1, 2),
        dt.transpose(1, 2),
        A,
        Bm.transpose(1, 2),
        Cm.transpose(1, 2),
        D,
        z.transpose(1, 2),
        delta_softplus=True,
    )
    ours_fn = lambda x, dt, z, Bm, Cm: selective_scan(
        x, dt, A, Bm, Cm, D, z, dt_softplus=True, backend="triton"
    )
    theirs = _time(_fwd_bwd(theirs_fn, x, dt, z, Bm, Cm), repeats)
    ours = _time(_fwd_bwd(ours_fn, x, dt, z, Bm, Cm), repeats)
    return {
        "zoo_path": "zoo.ops.selective_scan (triton)",
        "zoo_s": ours,
        "library_s": theirs,
        "library_over_zoo": theirs / ours,
    }


COMPARISONS = {"flash_attn": _flash_attn, "fla": _fla, "mamba_ssm": _mamba_ssm}


def compare_kernels(status: dict[str, str], repeats: int = 10) -> dict:
    """Each installed library's comparison (``status`` from ``bench.suite.third_party_status``); a failure is
    recorded, not raised."""
    out: dict = {
        "shape": SHAPE,
        "dtype": "bfloat16",
        "what": "forward + backward, median of synchronised runs",
    }
    for name, fn in COMPARISONS.items():
        if status.get(name) != "installed":
            out[name] = {"skipped": status.get(name, f"{name}: not checked")}
            continue
        try:
            out[name] = fn(repeats)
        except Exception as exc:  # a library version with another signature: say so, keep the rest
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


__all__ = ["COMPARISONS", "compare_kernels"]
