"""WKV4: RWKV-4's time-mixing recurrence, with a time decay and a current-token bonus per channel.

RWKV (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048, eq. 14). Per channel c,
with w = -exp(time_decay) < 0 and u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i) w + k_i} + e^{u + k_t})

kept in the numerically stable max-tracking form of transformers' ``RwkvSelfAttention``: the state is one tensor
[N, 3, C] of (numerator, denominator, max), ``state.unbind(1)`` being transformers' ``[num, den, max]`` (see
``naive.py``). Backends (see ``zoo.ops.dispatch``): ``naive`` (the recurrence, a loop over time, the oracle),
``torch`` (chunked, ``chunk.py``) and ``triton`` (the recurrence as Triton kernels walking time forward, and back
for the gradients, ``triton.py``).

    out, final_state = wkv4(w, u, k, v, initial_state=h0, output_final_state=True)
    out_t, state = wkv4_step(w, u, k_t, v_t, state)          # decoding, O(1) per token
"""

from __future__ import annotations

import torch

from zoo.ops.dispatch import resolve_backend
from zoo.ops.wkv4 import chunk, naive

__all__ = ["wkv4", "wkv4_step"]


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"wkv4: {name} has shape {tuple(got.shape)}, expected {expected}")


def _check_floating(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"wkv4: {name} has dtype {t.dtype}, expected a floating dtype")


def _check_decay_bonus(w: torch.Tensor, u: torch.Tensor, C: int) -> None:
    for name, t in (("w", w), ("u", u)):
        if tuple(t.shape) != (C,):
            raise _shape_error(name, t, f"[C]=[{C}] (one per channel)")


def _validate(w, u, k, v, initial_state, cu_seqlens) -> int:
    """Check a full call; return the number of sequences (rows of the state)."""
    if k.dim() != 3:
        raise _shape_error("k", k, "[B, T, C]")
    B, T, C = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise _shape_error("v", v, f"the shape of k, [B, T, C]={list(k.shape)}")
    _check_floating(w=w, u=u, k=k, v=v, initial_state=initial_state)
    _check_decay_bonus(w, u, C)
    rows = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error("cu_seqlens", cu_seqlens, "[N + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"wkv4: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32")
        if B != 1:
            raise _shape_error("k", k, f"B == 1 when cu_seqlens is given (packed sequences), got B={B}")
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T:
            raise ValueError(f"wkv4: cu_seqlens runs from {first} to {last}, expected from 0 to T={T}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"wkv4: cu_seqlens={cu_seqlens.tolist()} decreases, expected non-decreasing")
        rows = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (rows, 3, C):
        raise _shape_error(
            "initial_state", initial_state, f"[N, 3, C]={[rows, 3, C]} (numerator, denominator, max)"
        )
    return rows


def wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """WKV over whole sequences.

    Args:
        w: [C] time decay per token, < 0 (RWKV-4 models pass -exp(time_decay)). u: [C] bonus of the current token
            (time_first).
        k, v: [B, T, C] keys and values.
        initial_state: [N, 3, C] (numerator, denominator, max), the state before the first token (N = B, or the
            number of packed sequences); None is the empty state (0, 0, -1e38).
        output_final_state: also return the state after the last token, [N, 3, C], float32 (float64 for float64
            inputs).
        cu_seqlens: LongTensor [N + 1] of cumulative lengths of sequences packed along T, with B == 1. No state
            crosses a boundary.
        chunk_size: tokens per chunk of the ``torch`` backend (its memory is about chunk_size times that of k;
            None: ``chunk.default_chunk_size``, 8); the ``triton`` backend walks token by token and has no chunks.
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.

    Returns:
        (out [B, T, C] in the dtype of v, final_state or None).
    """
    _validate(w, u, k, v, initial_state, cu_seqlens)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"wkv4: chunk_size={chunk_size}, expected a positive integer")
    name = resolve_backend("wkv4", backend, k.device)
    args = (w, u, k, v, initial_state, output_final_state, cu_seqlens)
    if name == "naive":
        return naive.naive_wkv4(*args)
    if name == "triton":
        # imported here so that zoo imports without triton, and triton is only imported when asked for
        from zoo.ops.wkv4 import triton as triton_impl

        return triton_impl.triton_wkv4(*args)
    return chunk.chunk_wkv4(*args, chunk_size=chunk_size)


def wkv4_step(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, O(1) in the context length.

    Args:
        w, u: [C]. k, v: [B, C] or [B, 1, C].
        state: [B, 3, C] (numerator, denominator, max), as returned by ``wkv4(..., output_final_state=True)`` or a
            previous step; None starts from the empty state.

    Returns:
        (out in the layout and dtype of v, new_state [B, 3, C] in the dtype of ``state``, float32 or float64 when it
        starts from None).
    """
    with_time = k.dim() == 3
    if with_time:
        if k.shape[1] != 1:
            raise _shape_error("k", k, "[B, C] or [B, 1, C] (one token)")
        k, v = k[:, 0], (v[:, 0] if v.dim() == 3 else v)
    if k.dim() != 2:
        raise _shape_error("k", k, "[B, C] or [B, 1, C] (one token)")
    B, C = k.shape
    if tuple(v.shape) != (B, C):
        raise _shape_error("v", v, f"the shape of k, [B, C]={[B, C]}")
    _check_floating(w=w, u=u, k=k, v=v, state=state)
    _check_decay_bonus(w, u, C)
    if state is not None and tuple(state.shape) != (B, 3, C):
        raise _shape_error("state", state, f"[B, 3, C]={[B, 3, C]}")
    acc = naive.state_dtype(k.dtype) if state is None else state.dtype
    if state is None:
        state = naive.empty_state(B, C, acc, k.device)
    out, state = naive.step(w.to(acc), u.to(acc), k.to(acc), v.to(acc), state)
    out = out.to(v.dtype)
    return (out[:, None] if with_time else out), state
