"""Kernel-level comparisons on a CUDA GPU, bf16, forward + backward, against the libraries users would otherwise run,
each only when installed (otherwise the result says it was skipped):

* ``flash_attn``: ``flash_attn_func(causal=True)`` against PyTorch SDPA, which zoo's attention dispatches to;
* ``fla``: ``chunk_simple_gla`` (scalar-gated linear attention, the retention recurrence) against
  ``zoo.ops.retention.retention``; ``chunk_rwkv6`` against ``zoo.ops.gla.gla`` with RWKV-6's bonus; ``chunk_rwkv7``
  against ``zoo.ops.delta_rule.dplr_delta_rule`` (each on its Triton backend, with the largest difference of the two
  forward outputs, relative to the largest output, so that the timings compare the same computation);
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
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    return _compare(lambda q, k, v: flash_attn_func(q, k, v, causal=True), sdpa, (q, k, v), "torch SDPA", repeats)


def _compare(theirs_fn, ours_fn, inputs, zoo_path: str, repeats: int) -> dict:
    """Times both on the same inputs (forward + backward) and measures how far their forward outputs differ."""
    with torch.no_grad():
        a = theirs_fn(*inputs)
        b = ours_fn(*inputs)
        a = (a[0] if isinstance(a, tuple) else a).float()
        b = (b[0] if isinstance(b, tuple) else b).float()
        rel_diff = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    theirs = _time(_fwd_bwd(theirs_fn, *inputs), repeats)
    ours = _time(_fwd_bwd(ours_fn, *inputs), repeats)
    return {
        "zoo_path": zoo_path,
        "zoo_s": ours,
        "library_s": theirs,
        "library_over_zoo": theirs / ours,
        "forward_max_rel_diff": rel_diff,
    }


def _fla(repeats: int) -> dict:
    """RetNet's retention (a fixed decay per head) against fla's scalar-gated linear attention."""
    from fla.ops.simple_gla import chunk_simple_gla

    from zoo.ops.retention import retention

    B, T, H, D = SHAPE["batch"], SHAPE["seq_len"], SHAPE["heads"], SHAPE["head_dim"]
    q, k, v = (_leaf(B, T, H, D, scale=0.1) for _ in range(3))
    log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(H, device="cuda", dtype=torch.float32)))
    gates = log_gamma.expand(B, T, H).contiguous()
    return _compare(
        lambda q, k, v: chunk_simple_gla(q, k, v, g=gates, scale=D**-0.5),
        lambda q, k, v: retention(q, k, v, log_gamma, backend="triton"),
        (q, k, v),
        "zoo.ops.retention (triton)",
        repeats,
    )


def _rwkv6_inputs():
    B, T, H, D = SHAPE["batch"], SHAPE["seq_len"], SHAPE["heads"], SHAPE["head_dim"]
    r, k, v = (_leaf(B, T, H, D, scale=0.3) for _ in range(3))
    # RWKV-6's decays: w = exp(-exp(x)), log w = -exp(x), here in about [-1.6, -0.0025]
    g = (-torch.exp(torch.empty(B, T, H, D, device="cuda").uniform_(-6.0, 0.5))).to(torch.bfloat16)
    u = _leaf(H, D, scale=0.5)
    return r, k, v, g.requires_grad_(), u


def _fla_rwkv6(repeats: int) -> dict:
    from fla.ops.rwkv6 import chunk_rwkv6

    from zoo.ops.gla import gla

    return _compare(
        lambda r, k, v, g, u: chunk_rwkv6(r, k, v, g, u, scale=1.0),
        lambda r, k, v, g, u: gla(r, k, v, g, u=u, scale=1.0, backend="triton"),
        _rwkv6_inputs(),
        "zoo.ops.gla with the bonus u (triton)",
        repeats,
    )


def _rwkv7_inputs():
    B, T, H, D = SHAPE["batch"], SHAPE["seq_len"], SHAPE["heads"], SHAPE["head_dim"]
    r, k, v = (_leaf(B, T, H, D, scale=0.3) for _ in range(3))
    # RWKV-7: log w = -0.6065 sigmoid(.) (w in (0.545, 1)); a = -kk, b = kk * iclr with kk a unit key
    g = (-0.6065 * torch.sigmoid(torch.randn(B, T, H, D, device="cuda"))).to(torch.bfloat16)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, D, device="cuda"))
    a = (-kk).to(torch.bfloat16).requires_grad_()
    b = (kk * iclr).to(torch.bfloat16).requires_grad_()
    return r, k, v, a, b, g.requires_grad_()


def _fla_rwkv7(repeats: int) -> dict:
    from fla.ops.rwkv7 import chunk_rwkv7

    from zoo.ops.delta_rule import dplr_delta_rule

    return _compare(
        lambda r, k, v, a, b, g: chunk_rwkv7(r, g, k, v, a, b, scale=1.0),
        lambda r, k, v, a, b, g: dplr_delta_rule(r, k, v, a, b, g, scale=1.0, backend="triton"),
        _rwkv7_inputs(),
        "zoo.ops.delta_rule.dplr_delta_rule (triton)",
        repeats,
    )


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
    return _compare(
        lambda *t: theirs_fn(*t).transpose(1, 2), ours_fn, (x, dt, z, Bm, Cm), "zoo.ops.selective_scan (triton)", repeats
    )


# comparison -> (the library it needs, the function)
COMPARISONS = {
    "flash_attn": ("flash_attn", _flash_attn),
    "fla": ("fla", _fla),
    "fla_rwkv6": ("fla", _fla_rwkv6),
    "fla_rwkv7": ("fla", _fla_rwkv7),
    "mamba_ssm": ("mamba_ssm", _mamba_ssm),
}


def compare_kernels(status: dict[str, str], repeats: int = 10) -> dict:
    """Each installed library's comparison (``status`` from ``bench.suite.third_party_status``); a failure is
    recorded, not raised."""
    out: dict = {
        "shape": SHAPE,
        "dtype": "bfloat16",
        "what": "forward + backward, median of synchronised runs",
    }
    for name, (library, fn) in COMPARISONS.items():
        if status.get(library) != "installed":
            out[name] = {"skipped": status.get(library, f"{library}: not checked")}
            continue
        try:
            out[name] = fn(repeats)
        except Exception as exc:  # a library version with another signature: say so, keep the rest
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


__all__ = ["COMPARISONS", "compare_kernels"]
