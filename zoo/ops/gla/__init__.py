"""Vector-decay linear attention: one op for gated linear attention, RWKV-6 and their family.

A matrix state per head, decayed per key channel by a per-token gate g = log decay <= 0:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o_t = scale * q_t^T S_t                                    GLA (Yang et al. 2023, arXiv:2312.06635)
    o_t = scale * q_t^T (S_{t-1} + diag(u) k_t v_t^T)          with a bonus u: RWKV-6 (Peng et al. 2024,
                                                               arXiv:2404.05892; q is its receptance r)

Backends (see ``zoo.ops.dispatch``): ``naive`` (the recurrent loop, the oracle), ``torch`` (chunked with
secondary chunking, ``chunk.py``) and ``triton`` (the same chunked form as Triton kernels, ``triton.py``; chunk sizes
that are not a power of 2 >= 16 run the ``torch`` form instead, with a warning).

    out, final_state = gla(q, k, v, g, initial_state=h0, output_final_state=True)          # GLA
    out, final_state = gla(r, k, v, g, u=u, scale=1.0)                                      # RWKV-6
    out_t, state = gla_step(q_t, k_t, v_t, g_t, state, u=u)                                 # decoding, O(1)
"""

from __future__ import annotations

import logging

import torch

from zoo.ops.dispatch import resolve_backend
from zoo.ops.gla import chunk, naive

__all__ = ["gla", "gla_step"]

logger = logging.getLogger(__name__)


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"gla: {name} has shape {tuple(got.shape)}, expected {expected}")


def _check_floating(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"gla: {name} has dtype {t.dtype}, expected a floating dtype")


def _check_tokens(q, k, v, g, u, lead: tuple[int, ...]) -> None:
    """k and g shaped like q (lead + (H, K)); v lead + (H, V); u (H, K)."""
    H, Dk = q.shape[-2:]
    for name, t in (("k", k), ("g", g)):
        if tuple(t.shape) != tuple(q.shape):
            raise _shape_error(name, t, f"the shape of q, {list(q.shape)}")
    if v.dim() != q.dim() or tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise _shape_error("v", v, f"[{', '.join(map(str, (*lead, H)))}, V]")
    if u is not None and tuple(u.shape) != (H, Dk):
        raise _shape_error("u", u, f"[H, K]=[{H}, {Dk}]")
    _check_floating(q=q, k=k, v=v, g=g, u=u)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"gla: {name} has dtype {t.dtype}, expected the dtype of q, {q.dtype}")


def _validate(q, k, v, g, u, initial_state, cu_seqlens) -> int:
    """Check a full call; return the number of sequences (rows of the state)."""
    if q.dim() != 4:
        raise _shape_error("q", q, "[B, T, H, K]")
    B, T, H, Dk = q.shape
    _check_tokens(q, k, v, g, u, (B, T))
    rows = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error("cu_seqlens", cu_seqlens, "[N + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"gla: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32")
        if B != 1:
            raise _shape_error("q", q, f"B == 1 when cu_seqlens is given (packed sequences), got B={B}")
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T:
            raise ValueError(f"gla: cu_seqlens runs from {first} to {last}, expected from 0 to T={T}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"gla: cu_seqlens={cu_seqlens.tolist()} decreases, expected non-decreasing")
        rows = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (rows, H, Dk, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise _shape_error("initial_state", initial_state, f"[N, H, K, V]={list(expected)}")
        _check_floating(initial_state=initial_state)
    return rows


# tokens per chunk when none is given, per backend (see ``gla``)
DEFAULT_CHUNK_SIZE = {"torch": 32, "triton": 64}


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    u: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vector-decay linear attention over whole sequences.

    Args:
        q, k: [B, T, H, K] queries (RWKV-6: receptance) and keys. v: [B, T, H, V].
        g: [B, T, H, K] log decays (<= 0), per token and key channel (RWKV-6: w_t = exp(g_t)).
        u: [H, K] bonus of the current token. None: GLA, the query reads S_t; given: RWKV-6, the query reads
            S_{t-1} + diag(u) k_t v_t^T.
        scale: multiplies every output; defaults to K ** -0.5 (RWKV-6 models pass 1.0).
        initial_state: [N, H, K, V], the state before the first token (N = B, or the number of packed
            sequences).
        output_final_state: also return the state after the last token, [N, H, K, V], float32 (float64 for float64
            inputs).
        cu_seqlens: LongTensor [N + 1] of cumulative lengths of sequences packed along T, with B == 1. No state
            crosses a boundary.
        chunk_size: tokens per chunk of the chunked backends (a power of 2 >= 16 for ``triton``, which runs the
            ``torch`` form for other sizes). None: 64 on ``triton``, 32 on ``torch`` (two sub-chunks of 16; measured
            on a CPU at heads of 64: 16 and 32 within 10%, 64 1.5x slower for the backward).
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.

    Returns:
        (out [B, T, H, V] in the dtype of v, final_state or None).
    """
    _validate(q, k, v, g, u, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_backend("gla", backend, q.device)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE.get(name, 64)
    if chunk_size < 1:
        raise ValueError(f"gla: chunk_size={chunk_size}, expected a positive integer")
    args = (q, k, v, g, u, scale, initial_state, output_final_state, cu_seqlens)
    if name == "naive":
        return naive.naive_recurrent_gla(*args)
    if name == "triton":
        if chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0:
            # imported here so that zoo imports without triton, and triton is only imported when asked for
            from zoo.ops.gla import triton as triton_impl

            return triton_impl.triton_gla(*args, chunk_size=chunk_size)
        logger.warning(
            "gla: the triton kernels need chunk_size a power of 2 >= 16, got %d; running the torch form",
            chunk_size,
        )
    return chunk.chunk_gla(*args, chunk_size=chunk_size)


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    u: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, O(1) in the context length.

    Args:
        q, k, g: [B, H, K] or [B, 1, H, K]. v: [B, H, V] or [B, 1, H, V] (the layout of q). u: [H, K] or None.
        state: [B, H, K, V], as returned by ``gla(..., output_final_state=True)`` or a previous step; None starts
            from zeros.
        scale: defaults to K ** -0.5.

    Returns:
        (out in the layout and dtype of v, new_state [B, H, K, V] in the dtype of ``state``, float32 or float64 when
        it starts from None).
    """
    with_time = q.dim() == 4
    if with_time:
        if q.shape[1] != 1:
            raise _shape_error("q", q, "[B, H, K] or [B, 1, H, K] (one token)")
        q, k, v, g = (x[:, 0] if x.dim() == 4 else x for x in (q, k, v, g))
    if q.dim() != 3:
        raise _shape_error("q", q, "[B, H, K] or [B, 1, H, K] (one token)")
    B, H, Dk = q.shape
    _check_tokens(q, k, v, g, u, (B,))
    Dv = v.shape[-1]
    if state is not None and tuple(state.shape) != (B, H, Dk, Dv):
        raise _shape_error("state", state, f"[B, H, K, V]={[B, H, Dk, Dv]}")
    _check_floating(state=state)
    if scale is None:
        scale = Dk**-0.5
    acc = naive.state_dtype(q.dtype) if state is None else state.dtype
    if state is None:
        state = q.new_zeros(B, H, Dk, Dv, dtype=acc)
    u = None if u is None else u.to(acc)
    out, state = naive.step(*(x.to(acc) for x in (q, k, v, g)), u, scale, state)
    out = out.to(v.dtype)
    return (out[:, None] if with_time else out), state
