"""Retention: the linear recurrence of RetNet and of gated linear attention, with a scalar decay per head.

RetNet (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models",
arXiv:2307.08621) decays the state by a fixed gamma per head; gated linear attention (Yang et al. 2023,
"Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv:2312.06635) lets the decay
depend on the token. Here both are one op, in log space:

    S_t = exp(g_t) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

``decay`` is either log(gamma) with shape [H] (fixed, RetNet) or per-token log-gates with shape [B, T, H]
(data-dependent, <= 0). q and k may be grouped: G heads of q and k, G dividing the H heads of v, head h reading
group h // (H / G) (as grouped-query attention shares keys, and as Mamba-2's SSD shares B and C among the heads
of a group, Dao & Gu 2024, arXiv:2405.21060); the chunked forms then compute the scores of a group once. Backends (see ``zoo.ops.dispatch``): ``naive`` (the recurrent loop, the oracle),
``torch`` (chunkwise PyTorch), ``triton`` (chunkwise Triton kernels).

    out, final_state = retention(q, k, v, decay, initial_state=h0, output_final_state=True)
    out_t, state = retention_step(q_t, k_t, v_t, decay_t, state)     # decoding, O(1) per token
"""

from __future__ import annotations

import math

import torch

from zoo.ops.dispatch import resolve_backend
from zoo.ops.retention import chunk, naive

__all__ = ["default_chunk_size", "retention", "retention_step"]

TRITON_CHUNK_SIZE = 64


def default_chunk_size(backend: str, Dk: int, Dv: int) -> int:
    """The chunk length ``retention`` uses when none is given, for a backend and head sizes Dk, Dv.

    ``torch``: per token and head, the chunked form costs about C (Dk + Dv) multiply-adds in its (C, C) blocks
    plus elementwise work on them, while the state products cost about Dk Dv whatever C is; short chunks only add
    per-chunk overhead. The power of 2 at or below sqrt(Dk Dv), between 16 and 128, was the fastest or within 10%
    of it when measured on a CPU (forward + backward, T = 2048, per-token gates): 16 for Dk = Dv = 16 (grouped, 32
    heads: 16, 17 and 19 ms in chunks of 16, 32 and 64), 32-64 for 16x64, 64x64 and 128x64, 128 for 256x256.
    ``triton``: 64 (the kernels' tile).
    ``naive`` ignores it.
    """
    if backend != "torch":
        return TRITON_CHUNK_SIZE
    root = max(Dk * Dv, 1) ** 0.5
    return int(min(max(2 ** int(math.log2(root)), 16), 128))


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"retention: {name} has shape {tuple(got.shape)}, expected {expected}")


def _token_gates(decay: torch.Tensor, B: int, T: int, H: int) -> torch.Tensor:
    """Validate ``decay``; return per-token log-gates (B, T, H), a fixed [H] decay broadcast as a view."""
    if not decay.is_floating_point():
        raise ValueError(f"retention: decay has dtype {decay.dtype}, expected a floating dtype (log-decay)")
    if decay.dim() == 1 and decay.shape[0] == H:
        return decay.expand(B, T, H)
    if decay.dim() == 3 and tuple(decay.shape) == (B, T, H):
        return decay
    raise _shape_error(
        "decay", decay, f"[H]=[{H}] (fixed log-decay) or [B, T, H]=[{B}, {T}, {H}] (log-gates)"
    )


def _check_groups(v: torch.Tensor, G: int, where: str = "retention") -> None:
    """q and k hold G heads (groups) for the H heads of v (axis -2): G must divide H."""
    H = v.shape[-2]
    if G < 1 or H % G != 0:
        raise ValueError(
            f"{where}: v has shape {tuple(v.shape)} with H={H} heads, but q and k have G={G}: G must divide H "
            f"(head h of v reads group h // (H / G) of q and k; G = H for one q and k per head)"
        )


def _validate(q, k, v, initial_state, cu_seqlens, row_sum: bool = False) -> int:
    """Check shapes and dtypes of a full call; return N, the number of sequences (rows of the state)."""
    if q.dim() != 4:
        raise _shape_error("q", q, "[B, T, H, Dk] or [B, T, G, Dk] (G groups of heads)")
    B, T, G, Dk = q.shape
    if not q.is_floating_point():
        raise ValueError(f"retention: q has dtype {q.dtype}, expected a floating dtype")
    if tuple(k.shape) != tuple(q.shape):
        raise _shape_error("k", k, f"the shape of q, [B, T, G, Dk]={list(q.shape)}")
    if v.dim() != 4 or tuple(v.shape[:2]) != (B, T):
        raise _shape_error("v", v, f"[B, T, H, Dv]=[{B}, {T}, H, Dv]")
    _check_groups(v, G)
    H = v.shape[2]
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"retention: {name} has dtype {x.dtype}, expected the dtype of q, {q.dtype}")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error("cu_seqlens", cu_seqlens, "[N + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"retention: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32"
            )
        if B != 1:
            raise _shape_error("q", q, f"B == 1 when cu_seqlens is given (packed sequences), got B={B}")
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T:
            raise ValueError(f"retention: cu_seqlens runs from {first} to {last}, expected from 0 to T={T}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (N, H, Dk, v.shape[-1] + int(row_sum))
        if tuple(initial_state.shape) != expected:
            what = (
                "[N, H, Dk, Dv + 1] (with the key-sum column of output_row_sum)"
                if row_sum
                else "[N, H, Dk, Dv]"
            )
            raise _shape_error("initial_state", initial_state, f"{what}={list(expected)}")
        if not initial_state.is_floating_point():
            raise ValueError(f"retention: initial_state has dtype {initial_state.dtype}, expected float32/64")
    return N


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    output_row_sum: bool = False,
    v_scale: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Retention over whole sequences.

    Args:
        q, k: [B, T, H, Dk], or [B, T, G, Dk] with G dividing H: grouped, head h of v reading group
            h // (H / G) of q and k (no copies: the chunked forms compute each group's scores once).
        v: [B, T, H, Dv].
        decay: log-decay, [H] (fixed per head, log gamma) or [B, T, H] (per-token log-gates, <= 0).
        scale: multiplies q S_t; defaults to Dk ** -0.5.
        initial_state: [N, H, Dk, Dv], the state before the first token (N = B, or the number of packed
            sequences).
        output_final_state: also return the state after the last token, [N, H, Dk, Dv], float32 (float64
            for float64 inputs).
        cu_seqlens: LongTensor [N + 1] of cumulative lengths of sequences packed along T, with B == 1. No
            state crosses a boundary.
        chunk_size: tokens per chunk in the chunked backends (a power of 2 >= 16 for ``triton``). None: chosen per
            backend (``default_chunk_size``): on ``torch`` from the head sizes (small heads run fastest with short
            chunks, whose (C, C) blocks cost less than the state products they replace), 64 on ``triton``. The
            result does not depend on it beyond float rounding.
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.
        output_row_sum: also return the row sums of the decayed scores, r_n = scale * sum_m (q_n . k_m)
            exp(G_n - G_m) (the output for a value of ones; RetNet's normaliser), [B, T, H], without gradient.
            The state then carries their recurrence, the decayed key sum, as one more, last column:
            ``initial_state`` and the final state are [N, H, Dk, Dv + 1]. The ``torch`` and ``triton`` backends
            read them off the score blocks they compute anyway; ``naive`` runs a second pass with v = 1.
        v_scale: [B, T, H] or None: the values are ``v * v_scale[..., None]`` (Mamba-2's time steps, v = dt x),
            with gradients for both. The ``torch`` backend's grouped form (grouped q, k without packed documents
            or row sums) folds the scale into its per-token decay factors instead of forming the product; every
            other form multiplies first.
        skip: [H] or None: adds ``skip[h] * v`` (v as given, before ``v_scale``) to head h's output (Mamba's D
            term), with gradients; inside the grouped form's passes over its chunks, after the op elsewhere.

    Returns:
        (out [B, T, H, Dv] in the dtype of v, final_state or None), and the row sums as a third element with
        ``output_row_sum``.
    """
    _validate(q, k, v, initial_state, cu_seqlens, output_row_sum)
    B, T, _, Dk = q.shape
    H = v.shape[2]
    g = _token_gates(decay, B, T, H)
    if scale is None:
        scale = Dk**-0.5
    name = resolve_backend("retention", backend, q.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(name, Dk, v.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"retention: chunk_size={chunk_size}, expected a positive integer")
    for what, x, shape, dims in (("v_scale", v_scale, (B, T, H), "[B, T, H]"), ("skip", skip, (H,), "[H]")):
        if x is None:
            continue
        if not x.is_floating_point():
            raise ValueError(f"retention: {what} has dtype {x.dtype}, expected a floating dtype")
        if tuple(x.shape) != shape:
            raise _shape_error(what, x, f"{dims}={list(shape)}")
    if (
        (v_scale is not None or skip is not None)
        and name == "torch"
        and chunk.runs_grouped(q, v, cu_seqlens, output_row_sum)
    ):
        from zoo.ops.retention.grouped import grouped_chunk_retention

        return grouped_chunk_retention(
            q, k, v, g, scale, initial_state, output_final_state, chunk_size, v_scale, skip
        )
    values = v
    if v_scale is not None:
        v = v * v_scale[..., None].to(v.dtype)
    result = _unfused(
        q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, name, chunk_size, output_row_sum
    )
    if skip is not None:
        result = (result[0] + values * skip[:, None].to(values.dtype), *result[1:])
    return result


def _unfused(
    q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, name, chunk_size, output_row_sum
):
    """``retention`` on the backend ``name``, the values already scaled."""
    args = (q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if name == "torch":
        return chunk.chunk_retention(*args, chunk_size=chunk_size, row_sum=output_row_sum)
    if name == "triton":
        # imported here so that zoo imports without triton, and triton is only imported when asked for
        from zoo.ops.retention import triton as triton_impl

        return triton_impl.triton_retention(*args, chunk_size=chunk_size, row_sum=output_row_sum)
    if output_row_sum:
        return naive.with_row_sum(naive.naive_recurrent_retention, *args)
    return naive.naive_recurrent_retention(*args)


def retention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, O(1) in the context length: S = exp(g) S + k^T v; o = scale q S.

    Args:
        q, k: [B, H, Dk] or [B, 1, H, Dk]; or grouped, [B, G, Dk] / [B, 1, G, Dk] with G dividing H (as in
            ``retention``). v: [B, H, Dv] or [B, 1, H, Dv] (the same layout as q).
        decay: [H] (fixed log gamma), or [B, H] / [B, 1, H] (this token's log-gates).
        state: [B, H, Dk, Dv], as returned by ``retention(..., output_final_state=True)`` or a previous step.
        scale: defaults to Dk ** -0.5.

    Returns:
        (out in the layout of v, new_state [B, H, Dk, Dv] in the dtype of ``state``).
    """
    with_time = q.dim() == 4
    if with_time:
        if q.shape[1] != 1:
            raise _shape_error("q", q, "[B, H, Dk] or [B, 1, H, Dk] (one token)")
        q, k, v = (x[:, 0] if x.dim() == 4 else x for x in (q, k, v))
        if decay.dim() == 3:
            decay = decay[:, 0]
    if q.dim() != 3:
        raise _shape_error("q", q, "[B, H, Dk] or [B, 1, H, Dk] (one token)")
    B, G, Dk = q.shape
    if tuple(k.shape) != (B, G, Dk):
        raise _shape_error("k", k, f"the shape of q, {[B, G, Dk]}")
    if v.dim() != 3 or v.shape[0] != B:
        raise _shape_error("v", v, f"[B, H, Dv]=[{B}, H, Dv]")
    _check_groups(v, G, "retention_step")
    H, Dv = v.shape[1:]
    if tuple(state.shape) != (B, H, Dk, Dv):
        raise _shape_error("state", state, f"[B, H, Dk, Dv]={[B, H, Dk, Dv]}")
    if decay.dim() == 1 and decay.shape[0] == H:
        decay = decay.expand(B, H)
    elif tuple(decay.shape) != (B, H):
        raise _shape_error("decay", decay, f"[H]=[{H}] or [B, H]=[{B}, {H}]")
    if scale is None:
        scale = Dk**-0.5
    if not state.is_floating_point():
        raise ValueError(f"retention_step: state has dtype {state.dtype}, expected float32/64")
    acc = state.dtype
    R = H // G  # heads per group of q and k
    qf, kf = q.to(acc)[:, :, None], k.to(acc)[:, :, None]  # (B, G, 1, Dk): broadcast over a group's heads
    vf = v.to(acc).reshape(B, G, R, Dv)
    update = (kf[..., :, None] * vf[..., None, :]).view(B, H, Dk, Dv)
    new_state = decay.to(acc).exp()[..., None, None] * state.to(acc) + update
    out = scale * (qf[..., None, :] @ new_state.view(B, G, R, Dk, Dv))  # (B, G, R, 1, Dv)
    out = out.reshape(B, H, Dv).to(v.dtype)
    return (out[:, None] if with_time else out), new_state
