"""Chunkwise retention as Triton kernels, forward and backward, wrapped in ``torch.autograd.Function``.

Same math as ``chunk.py`` (RetNet, Sun et al. 2023, arXiv:2307.08621, chunkwise recurrent form; per-token
gates as in gated linear attention, Yang et al. 2023, arXiv:2312.06635). Within a chunk of BT tokens, with b
the cumulative log-gate from the chunk start (b_C its last entry) and D_ij = exp(b_i - b_j) for i >= j:

    forward   o  = scale * [ ((Q K^T) * D) V + (Q * exp(b)) S ]
              S <- exp(b_C) S + (K * exp(b_C - b))^T V
    backward  dQ = scale * [ ((dO V^T) * D) K + (dO * exp(b)) S^T ]
              dK = scale * ((dO V^T) * D)^T Q + (V * exp(b_C - b)) dS^T
              dV = scale * ((Q K^T) * D)^T dO + (K * exp(b_C - b)) dS
              dS <- exp(b_C) dS + scale (Q * exp(b))^T dO

where S is the state entering the chunk (saved by the forward, one (Dk, Dv) matrix per chunk) and dS the
gradient of the loss w.r.t. the state leaving it (carried backwards from the last chunk; it ends as the
initial_state grad).

One program owns one (sequence, head) pair and walks its chunks in order (forward) or in reverse (backward),
holding the whole (Dk, Dv) state in registers; head dims up to 128 fit. Sequences are addressed through
``cu_seqlens``, so packed variable-length batches run in one launch, and a regular (B, T) batch is just B
packed sequences of length T.

Gradient of the log-gates. Writing G_t for the cumulative log-gate, o_i depends on G only through
q~_i = q_i exp(G_i) and k~_j = k_j exp(-G_j) (and the final state through exp(G_T)), so
dL/dG_t = q_t . dq_t - k_t . dk_t (+ <dS_T, S_T> at the last token), and dL/dg_t is the reverse cumulative sum
of that over t' >= t. The backward kernel computes it per chunk from the dq, dk it already holds (a reverse
``tl.cumsum`` plus a scalar carried across chunks), so no extra pass is needed. A fixed per-head decay [H]
reaches here expanded to [B, T, H]; autograd sums the per-token gradient back to [H].

Dots run in IEEE float32 for float32/float64 inputs; everything accumulates in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.ops.retention.chunk import keep_chunk_states
from zoo.ops.retention.naive import state_dtype


@triton.jit
def _retention_fwd_kernel(
    q,  # (TT, H, K) packed tokens
    k,  # (TT, H, K)
    v,  # (TT, H, V)
    g,  # (TT, H) log-gates
    o,  # (TT, H, V) output
    h0,  # (N, H, K, V) initial states, read if USE_H0
    ht,  # (N, H, K, V) final states, float32
    hs,  # (NC, H, K, V) state entering every chunk, float32, written if STORE_HS (for the backward)
    rs,  # (TT, H) row sums of the scores, float32, written if ROW_SUM
    z0,  # (N, H, K) initial decayed key sums, read if ROW_SUM and USE_H0
    zt,  # (N, H, K) final decayed key sums, float32, written if ROW_SUM
    cu_seqlens,  # (N + 1,) sequence boundaries in the packed token axis
    chunk_offsets,  # (N + 1,) index of each sequence's first chunk in hs
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HS: tl.constexpr,
    ROW_SUM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(T, BT)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    # offsets of one (K, V) state matrix, padded to (BK, BV)
    p_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    # the decayed key sum: the state of a value of ones, whose outputs are the row sums of the scores
    b_z = tl.zeros([BK], dtype=tl.float32)
    if ROW_SUM and USE_H0:
        b_z += tl.load(z0 + (i_n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)

    for i_c in range(0, NT):
        tok = bos + i_c * BT + o_t  # (BT,) packed token index
        m_t = (i_c * BT + o_t) < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # Padded rows load k = 0 and g = 0: they add nothing to the state and do not decay it.
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)

        if STORE_HS:
            tl.store(hs + ((c0 + i_c) * H + i_h) * K * V + p_kv, b_S, mask=m_kv)

        b_b = tl.cumsum(b_g, axis=0)  # (BT,) log-decay from the chunk start
        b_last = tl.sum(b_g, axis=0)  # log-decay over the whole chunk (padded gates are 0)
        # Mask before exp: above the diagonal b_i - b_j > 0 and could overflow.
        b_D = tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], float("-inf")))  # (BT, BT)
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * b_D  # (BT, BT)
        b_q_start = b_q * tl.exp(b_b)[:, None]  # (BT, BK)
        b_o = tl.dot(b_A, b_v, input_precision=PRECISION)
        b_o += tl.dot(b_q_start, b_S, input_precision=PRECISION)  # (BT, BV)
        tl.store(
            o + (tok[:, None] * H + i_h) * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_tv
        )

        b_k_to_end = b_k * tl.exp(b_last - b_b)[:, None]  # (BT, BK)
        b_S = b_S * tl.exp(b_last) + tl.dot(tl.trans(b_k_to_end), b_v, input_precision=PRECISION)
        if ROW_SUM:
            b_rs = tl.sum(b_A, axis=1) + tl.sum(b_q_start * b_z[None, :], axis=1)  # (BT,)
            tl.store(rs + tok * H + i_h, b_rs * scale, mask=m_t)
            b_z = b_z * tl.exp(b_last) + tl.sum(b_k_to_end, axis=0)

    tl.store(ht + (i_n * H + i_h) * K * V + p_kv, b_S, mask=m_kv)
    if ROW_SUM:
        tl.store(zt + (i_n * H + i_h) * K + o_k, b_z, mask=m_k)


@triton.jit
def _retention_bwd_kernel(
    q,  # (TT, H, K)
    k,  # (TT, H, K)
    v,  # (TT, H, V)
    g,  # (TT, H)
    do,  # (TT, H, V) grad of the output
    hs,  # (NC, H, K, V) states entering each chunk, from the forward
    ht,  # (N, H, K, V) final states, from the forward, read if USE_DHT
    dht,  # (N, H, K, V) grad of the final states, read if USE_DHT
    dq,  # (TT, H, K) float32
    dk,  # (TT, H, K) float32
    dv,  # (TT, H, V) float32
    dg,  # (TT, H) float32 grad of the log-gates
    dh0,  # (N, H, K, V) float32 grad of the initial states
    cu_seqlens,
    chunk_offsets,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(T, BT)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    # dS: grad w.r.t. the state leaving the current chunk. dg_later: sum of dL/dG over all later tokens of
    # this sequence, i.e. the part of the reverse cumsum that comes from later chunks.
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    dg_later = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    if USE_DHT:
        b_dS += tl.load(dht + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_ST = tl.load(ht + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)
        # the final state carries exp(G_T) on every term, so dL/dG_T gains <dS_T, S_T>
        dg_later += tl.sum(tl.sum(b_dS * b_ST, axis=1), axis=0)

    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tok = bos + i_c * BT + o_t
        m_t = (i_c * BT + o_t) < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_S = tl.load(hs + ((c0 + i_c) * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)  # state entering

        b_b = tl.cumsum(b_g, axis=0)  # (BT,)
        b_last = tl.sum(b_g, axis=0)
        b_D = tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], float("-inf"))) * scale  # (BT, BT)
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * b_D  # scaled, decayed scores
        b_dP = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION) * b_D  # (BT, BT)
        b_to_end = tl.exp(b_last - b_b)  # (BT,)
        b_from_start = tl.exp(b_b)  # (BT,)

        b_dq = tl.dot(b_dP, b_k, input_precision=PRECISION)
        b_dq += tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION) * (b_from_start * scale)[:, None]
        b_dk = tl.dot(tl.trans(b_dP), b_q, input_precision=PRECISION)
        b_dk += tl.dot(b_v, tl.trans(b_dS), input_precision=PRECISION) * b_to_end[:, None]
        b_dv = tl.dot(tl.trans(b_A), b_do, input_precision=PRECISION)
        b_dv += tl.dot(b_k, b_dS, input_precision=PRECISION) * b_to_end[:, None]

        # dL/dG_t = q_t . dq_t - k_t . dk_t; dL/dg_t = sum over t' >= t (this chunk's part, then later chunks)
        b_dG = tl.sum(b_q * b_dq, axis=1) - tl.sum(b_k * b_dk, axis=1)  # (BT,), 0 on padded rows
        b_dg = tl.cumsum(b_dG, axis=0, reverse=True) + dg_later
        dg_later += tl.sum(b_dG, axis=0)

        tl.store(dq + (tok[:, None] * H + i_h) * K + o_k[None, :], b_dq, mask=m_tk)
        tl.store(dk + (tok[:, None] * H + i_h) * K + o_k[None, :], b_dk, mask=m_tk)
        tl.store(dv + (tok[:, None] * H + i_h) * V + o_v[None, :], b_dv, mask=m_tv)
        tl.store(dg + tok * H + i_h, b_dg, mask=m_t)

        # step the state grad back across this chunk
        b_q_from_start = b_q * (b_from_start * scale)[:, None]
        b_dS = b_dS * tl.exp(b_last) + tl.dot(tl.trans(b_q_from_start), b_do, input_precision=PRECISION)

    tl.store(dh0 + (i_n * H + i_h) * K * V + p_kv, b_dS, mask=m_kv)


def _block(n: int) -> int:
    """Power-of-2 block covering n; tl.dot needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(n))


def _chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N + 1,) where sequence n's chunks start in the flat list of all chunks."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_chunks = (lengths + chunk_size - 1) // chunk_size
    return torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])


def _precision(dtype: torch.dtype) -> str:
    # tf32 would cost ~1e-3 relative error on float32 inputs; 16-bit inputs hold less than tf32 anyway.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _states_entering_chunks(q, k, v, g, h0, cu_seqlens, chunk_offsets, scale, chunk_size) -> torch.Tensor:
    """The state entering every chunk, (NC, H, K, V) float32, from one more run of the forward kernel (its
    outputs other than the states go to scratch buffers)."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    hs = q.new_empty(int(chunk_offsets[-1]), H, K, V, dtype=torch.float32)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32)
    unused = q.new_empty(0, dtype=torch.float32)
    _retention_fwd_kernel[(N * H,)](
        q, k, v, g, torch.empty_like(v), h0 if h0 is not None else ht, ht, hs, unused, unused, unused,
        cu_seqlens, chunk_offsets, scale,
        H=H, K=K, V=V, BT=chunk_size, BK=_block(K), BV=_block(V),
        USE_H0=h0 is not None, STORE_HS=True, ROW_SUM=False, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return hs


class _ChunkRetention(torch.autograd.Function):
    """Packed retention: q, k (1, TT, H, K); v (1, TT, H, V); g (1, TT, H); states (N, H, K, V)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, cu_seqlens, scale, chunk_size, row_sum):
        _, _, H, K = q.shape
        V = v.shape[-1]
        N = cu_seqlens.numel() - 1
        # The per-chunk states are kept only when a backward will need them (not under no_grad / inference), and
        # only while they are no larger than q, k and v (as in the torch op); otherwise the backward runs the
        # forward kernel once more to recompute them.
        needs_grad = any(ctx.needs_input_grad)
        store_hs = needs_grad and keep_chunk_states(K, V, chunk_size)
        chunk_offsets = _chunk_offsets(cu_seqlens, chunk_size)
        n_total = int(chunk_offsets[-1])
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = z0 = None
        if initial_state is not None:  # with row sums, the last column is the decayed key sum
            h0 = initial_state[..., :V].contiguous()
            z0 = initial_state[..., V].contiguous() if row_sum else None

        o = torch.empty_like(v)  # (1, TT, H, V)
        ht = q.new_empty(N, H, K, V, dtype=torch.float32)
        hs = q.new_empty(n_total if store_hs else 0, H, K, V, dtype=torch.float32)
        rs = q.new_empty(v.shape[:-1] if row_sum else (0,), dtype=torch.float32)  # (1, TT, H)
        zt = q.new_empty(N, H, K, dtype=torch.float32) if row_sum else rs
        _retention_fwd_kernel[(N * H,)](
            q, k, v, g, o, h0 if h0 is not None else ht, ht, hs, rs, z0 if z0 is not None else zt, zt,
            cu_seqlens, chunk_offsets, scale,
            H=H, K=K, V=V, BT=chunk_size, BK=_block(K), BV=_block(V),
            USE_H0=h0 is not None, STORE_HS=store_hs, ROW_SUM=row_sum, PRECISION=_precision(q.dtype),
        )  # fmt: skip
        # without stored states the backward needs the initial state to recompute them
        ctx.save_for_backward(q, k, v, g, hs, ht, cu_seqlens, chunk_offsets, None if store_hs else h0)
        ctx.scale, ctx.chunk_size, ctx.row_sum = scale, chunk_size, row_sum
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        final = ht if not row_sum else torch.cat([ht, zt[..., None]], dim=-1)
        sums = rs.to(v.dtype) if row_sum else None
        if sums is not None:
            ctx.mark_non_differentiable(sums)
        return o, final.to(state_dtype(q.dtype)), sums

    @staticmethod
    def backward(ctx, do, dht, _drs):
        q, k, v, g, hs, ht, cu_seqlens, chunk_offsets, h0 = ctx.saved_tensors
        _, _, H, K = q.shape
        V = v.shape[-1]
        if hs.numel() == 0:  # not stored in the forward (a backward runs only when gradients were needed)
            hs = _states_entering_chunks(q, k, v, g, h0, cu_seqlens, chunk_offsets, ctx.scale, ctx.chunk_size)
        if dht is not None and ctx.row_sum:  # the key-sum column carries no gradient
            dht = dht[..., :V]
        N = cu_seqlens.numel() - 1
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        dg = torch.empty(g.shape, dtype=torch.float32, device=q.device)
        dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
        _retention_bwd_kernel[(N * H,)](
            q, k, v, g, do, hs, ht, dht.contiguous() if dht is not None else ht,
            dq, dk, dv, dg, dh0, cu_seqlens, chunk_offsets, ctx.scale,
            H=H, K=K, V=V, BT=ctx.chunk_size, BK=_block(K), BV=_block(V),
            USE_DHT=dht is not None, PRECISION=_precision(q.dtype),
        )  # fmt: skip
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        if dh0 is not None and ctx.row_sum:
            dh0 = torch.nn.functional.pad(dh0, (0, 1))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dh0, None, None, None, None


def triton_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    row_sum: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Chunkwise retention on Triton kernels. q, k (B, T, H, Dk); v (B, T, H, Dv); g (B, T, H) log-gates.

    ``chunk_size`` must be a power of 2 and at least 16 (it is a Triton block size). With ``row_sum`` the
    forward kernel also writes the row sums (B, T, H), without gradient, and the state gains the decayed key sum
    as a last column: (out, state, row_sums).
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"retention (triton): chunk_size={chunk_size}, expected a power of 2 >= 16")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        # a regular batch is B packed sequences of length T
        cu = torch.arange(0, B + 1, device=q.device, dtype=torch.int64) * T
        packed = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g))
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        packed = (q, k, v, g)
    o, ht, sums = _ChunkRetention.apply(
        *packed, initial_state, cu.contiguous(), float(scale), chunk_size, row_sum
    )
    out = (o.reshape(B, T, H, V), ht if output_final_state else None)
    return (*out, sums.reshape(B, T, H)) if row_sum else out
