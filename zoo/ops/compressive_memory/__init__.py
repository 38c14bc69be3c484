"""Infini-attention's compressive memory: a linear-attention memory read per segment and written after it.

Munkhdalai et al. 2024, "Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention",
arXiv:2404.07143, section 2.1.2. The sequence is cut into segments of ``segment_length`` tokens; per head, a memory
M (Dk x Dv) and a normaliser z (Dk) are read by every token of a segment, then written with the whole segment:

    A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1} + eps)                                 σ = ELU + 1
    linear  M_s = M_{s-1} + σ(K)^T V
    delta   M_s = M_{s-1} + σ(K)^T (V - σ(K) M_{s-1} / (σ(K) z_{s-1} + eps))
            z_s = z_{s-1} + sum_t σ(K_t)

**The state is one tensor** [N, H, Dk, Dv + 1]: M in the first Dv columns, z in the last (the layout of
``zoo.ops.retention``'s ``output_row_sum``, whose key sum is this z without decay).

**The normaliser where z is zero.** Before the first write M and z are both zero, and the paper's read is 0 / 0.
The denominators carry ``+ eps`` (default 1e-6): where z = 0 (and so M = 0) the read, and the delta rule's
retrieval, are exactly zero, as an empty memory should give; once one segment is written σ(q) z is a sum of
positive terms of order one per token written, and eps changes the read by a relative ~eps / (σ(q) z). A
user-given initial state must keep z > 0 wherever M is nonzero (any state this op returns does).

**Segments** start at the first token of every sequence (of every packed sequence with ``cu_seqlens``); the last
one may be shorter, and it is written too: the final state is the memory after the whole input. To chain calls
(streaming), split at a multiple of ``segment_length``, or keep the unfinished segment's tokens and pass them again
with the next call, as the Infini-attention model's cache does (``compressive_memory_read`` reads the current
state for them meanwhile).

Backends (see ``zoo.ops.dispatch``): ``naive`` (the loop over segments, the oracle), ``torch`` (every segment at
once, see ``chunk.py``) and ``triton`` (fused kernels, forward and backward: one walk over the segments, every
token's read and gradients in parallel; see ``triton.py``).

    out, state = compressive_memory(q, k, v, segment_length=2048, update="delta", output_final_state=True)
    out_s, state = compressive_memory_step(q_s, k_s, v_s, state, update="delta")      # one segment
"""

from __future__ import annotations

import torch

from zoo.ops.compressive_memory import chunk, naive
from zoo.ops.compressive_memory.naive import feature_map, state_dtype
from zoo.ops.dispatch import resolve_backend

__all__ = [
    "UPDATE_RULES",
    "compressive_memory",
    "compressive_memory_read",
    "compressive_memory_step",
    "compressive_memory_write",
    "feature_map",
]

UPDATE_RULES = ("linear", "delta")


def _shape_error(op: str, name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{op}: {name} has shape {tuple(got.shape)}, expected {expected}")


def _check_update(op: str, update: str) -> None:
    if update not in UPDATE_RULES:
        raise ValueError(f"{op}: update={update!r}, expected one of {UPDATE_RULES}")


def _check_eps(op: str, eps: float) -> None:
    if not eps > 0:
        raise ValueError(
            f"{op}: eps={eps!r}, expected a positive number (it guards the division where z = 0)"
        )


def _check_state(op: str, state: torch.Tensor | None, N: int, H: int, Dk: int, Dv: int, name: str) -> None:
    if state is None:
        return
    expected = (N, H, Dk, Dv + 1)
    if tuple(state.shape) != expected:
        raise _shape_error(
            op, name, state, f"[N, H, Dk, Dv + 1]={list(expected)} (M, then z as the last column)"
        )
    if not state.is_floating_point():
        raise ValueError(f"{op}: {name} has dtype {state.dtype}, expected float32/64")


def _check_qkv(op: str, q, k, v) -> None:
    if q.dim() != 4:
        raise _shape_error(op, "q", q, "[B, T, H, Dk]")
    if not q.is_floating_point():
        raise ValueError(f"{op}: q has dtype {q.dtype}, expected a floating dtype")
    if tuple(k.shape) != tuple(q.shape):
        raise _shape_error(op, "k", k, f"the shape of q, [B, T, H, Dk]={list(q.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != tuple(q.shape[:3]):
        B, T, H, _ = q.shape
        raise _shape_error(op, "v", v, f"[B, T, H, Dv]=[{B}, {T}, {H}, Dv]")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{op}: {name} has dtype {x.dtype}, expected the dtype of q, {q.dtype}")


def compressive_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_length: int,
    update: str = "linear",
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The memory read of every token, and the memory after the last segment.

    Args:
        q, k: [B, T, H, Dk], before the feature map σ = ELU + 1 (applied here). v: [B, T, H, Dv].
        segment_length: tokens per segment (L); a token reads the memory written by the segments before its own.
        update: ``"linear"`` or ``"delta"``, the write rule.
        eps: added to the denominators of the read and of the delta rule's retrieval (see the module docstring).
        initial_state: [N, H, Dk, Dv + 1], (M, z) before the first segment; N = B, or the number of packed sequences.
        output_final_state: also return (M, z) after the last segment, [N, H, Dk, Dv + 1], float32 (float64 for
            float64 inputs).
        cu_seqlens: LongTensor [N + 1] of cumulative lengths of sequences packed along T, with B == 1. Segments
            restart at every sequence start; no state crosses a boundary.
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.

    Returns:
        (A_mem [B, T, H, Dv] in the dtype of v, final_state or None).
    """
    op = "compressive_memory"
    _check_qkv(op, q, k, v)
    _check_update(op, update)
    _check_eps(op, eps)
    if not isinstance(segment_length, int) or segment_length < 1:
        raise ValueError(f"{op}: segment_length={segment_length!r}, expected a positive integer")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error(op, "cu_seqlens", cu_seqlens, "[N + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32")
        if B != 1:
            raise _shape_error(op, "q", q, f"B == 1 when cu_seqlens is given (packed sequences), got B={B}")
        # the offsets' values are not read under torch.compile (a graph break); the eager call checks them
        if not torch.compiler.is_compiling() and (
            int(cu_seqlens[0]) != 0
            or int(cu_seqlens[-1]) != T
            or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any())
        ):
            raise ValueError(
                f"{op}: cu_seqlens={cu_seqlens.tolist()}, expected non-decreasing offsets from 0 to T={T}"
            )
        N = cu_seqlens.numel() - 1
    _check_state(op, initial_state, N, H, Dk, Dv, "initial_state")
    name = resolve_backend(op, backend, q.device)
    if T == 0:
        final = None
        if output_final_state:
            final = q.new_zeros(N, H, Dk, Dv + 1, dtype=state_dtype(q.dtype))
            if initial_state is not None:
                final = initial_state.to(final.dtype)
        return v.new_zeros(v.shape), final
    args = (q, k, v, segment_length, update, eps, initial_state, output_final_state, cu_seqlens)
    if name == "naive":
        return naive.naive_compressive_memory(*args)
    if name == "triton":
        # imported here so that zoo imports without triton, and triton is only imported when asked for
        from zoo.ops.compressive_memory import triton as triton_impl

        return triton_impl.triton_compressive_memory(*args)
    return chunk.chunk_compressive_memory(*args)


def compressive_memory_read(
    q: torch.Tensor, state: torch.Tensor | None, *, eps: float = 1e-6
) -> torch.Tensor:
    """σ(q) M / (σ(q) z + eps) for tokens of one segment each row, without writing: q [B, L, H, Dk], state
    [B, H, Dk, Dv + 1] (None: empty memory, Dv = Dk). Returns [B, L, H, Dv] in the dtype of q."""
    op = "compressive_memory_read"
    if q.dim() != 4:
        raise _shape_error(op, "q", q, "[B, L, H, Dk]")
    _check_eps(op, eps)
    B, _, H, Dk = q.shape
    if state is None:
        return q.new_zeros(q.shape)
    if state.dim() != 4:
        raise _shape_error(op, "state", state, f"[B, H, Dk, Dv + 1]=[{B}, {H}, {Dk}, Dv + 1]")
    _check_state(op, state, B, H, Dk, state.shape[-1] - 1, "state")
    with torch.autocast(q.device.type, enabled=False):  # in the state's dtype, whatever autocast would pick
        sq = feature_map(q.to(state.dtype))
        numerator = torch.einsum("blhk,bhkv->blhv", sq, state[..., :-1])
        denominator = torch.einsum("blhk,bhk->blh", sq, state[..., -1]) + eps
        return (numerator / denominator[..., None]).to(q.dtype)


def compressive_memory_write(
    k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None, *, update: str = "linear", eps: float = 1e-6
) -> torch.Tensor:
    """The memory after writing one segment per row: k [B, L, H, Dk], v [B, L, H, Dv], state [B, H, Dk, Dv + 1]
    (None: empty). Returns the new state, float32 (float64 for float64 inputs, or the dtype of ``state``)."""
    op = "compressive_memory_write"
    _check_update(op, update)
    _check_eps(op, eps)
    _check_qkv(op, k, k, v)
    B, _, H, Dk = k.shape
    Dv = v.shape[-1]
    _check_state(op, state, B, H, Dk, Dv, "state")
    acc = state_dtype(k.dtype) if state is None else state.dtype
    if state is None:
        state = k.new_zeros(B, H, Dk, Dv + 1, dtype=acc)
    with torch.autocast(k.device.type, enabled=False):  # in the state's dtype, whatever autocast would pick
        M, z = state[..., :Dv].to(acc), state[..., Dv].to(acc)
        sk, vv = feature_map(k.to(acc)), v.to(acc)
        if update == "delta":
            retrieved = torch.einsum("blhk,bhkv->blhv", sk, M)
            vv = vv - retrieved / (torch.einsum("blhk,bhk->blh", sk, z) + eps)[..., None]
        M = M + torch.einsum("blhk,blhv->bhkv", sk, vv)
        z = z + sk.sum(1)
        return torch.cat([M, z[..., None]], dim=-1)


def compressive_memory_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    update: str = "linear",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole segment per row, for streaming: the read of its tokens from ``state``, then the state with the
    segment written. q, k [B, L, H, Dk]; v [B, L, H, Dv]; state [B, H, Dk, Dv + 1] or None (empty).

    Returns (A_mem [B, L, H, Dv] in the dtype of v, new state). Equal to ``compressive_memory`` over a sequence of
    segments fed one at a time.
    """
    _check_qkv("compressive_memory_step", q, k, v)
    new_state = compressive_memory_write(k, v, state, update=update, eps=eps)
    if state is None:
        out = v.new_zeros(v.shape)
    else:
        out = compressive_memory_read(q, state, eps=eps).to(v.dtype)
    return out, new_state
