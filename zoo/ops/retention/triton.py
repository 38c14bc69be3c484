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

where S is the state entering the chunk and dS the gradient of the loss w.r.t. the state leaving it (carried
backwards from the last chunk; it ends as the initial_state grad).

Tiling. One program holding a whole (Dk, Dv) state does not fit a GPU at the head sizes models use: at Dk 128 /
Dv 256 the state alone is 128 KB of float32, and the dots that read it stage ~400 KB in shared memory (an H100
has 227 KB per block, an A100 163 KB). So the work is split the way the chunkwise kernels of gated linear
attention split it (Yang et al. 2023, the FlashLinearAttention chunkwise form; the ``chunk`` kernels of
flash-linear-attention): tiles of BK key and BV value channels per program, and the chunks in parallel wherever
no state is carried:

    forward   1. _chunk_states_fwd_kernel    grid (N*H, K/BK, V/BV): each program walks its sequence's chunks in
                 order with one (BK, BV) tile of the state and writes the tile entering every chunk (hs).
              2. _chunk_output_fwd_kernel    grid (chunks, V/BV, H): every chunk at once; loops over the BK
                 tiles of the keys to accumulate Q K^T and Q S, then adds the decayed scores times V.
    backward  3. _chunk_dstates_bwd_kernel   grid (N*H, K/BK, V/BV): the reverse walk, writing the gradient of the
                 state leaving every chunk (dhs) and ending with the initial-state gradient.
              4. _chunk_dv_bwd_kernel        grid (chunks, V/BV, H): dV, looping over the BK tiles.
              5. _chunk_dqk_bwd_kernel       grid (chunks, K/BK, H): dQ and dK, looping over the BV tiles, and each
                 key tile's share of q . dq - k . dk.
              6. _gate_grad_bwd_kernel       grid (N*H,): the gate gradient, a reverse cumulative sum per sequence.

Only the sequential walks (1, 3) hold a state tile across chunks; everything quadratic in the chunk runs in
parallel over chunks, the per-chunk kernels recomputing the (BT, BT) score block once per tile they own. Block
sizes come from ``launch_config``: BT is the chunk (at most 64 tokens), BK and BV the largest power-of-2 tiles
whose live blocks fit a register budget and whose staged operands fit ``SHARED_MEMORY_BUDGET`` (below an A100's
163 KB): 32 channels at the usual head sizes, whatever Dk and Dv are, for 8-33 KB of shared memory per block and
no register spills on sm_80 and sm_90. ``tests/ops/test_triton_gpu_compile.py`` compiles every kernel for both
at the configs' head sizes to check it.

Sequences are addressed through ``cu_seqlens``, so packed variable-length batches run in one launch, and a
regular (B, T) batch is just B packed sequences of length T; the per-chunk kernels find their sequence in
``chunk_indices``.

Gradient of the log-gates. Writing G_t for the cumulative log-gate, o_i depends on G only through
q~_i = q_i exp(G_i) and k~_j = k_j exp(-G_j) (and the final state through exp(G_T)), so
dL/dG_t = q_t . dq_t - k_t . dk_t (+ <dS_T, S_T> at the last token), and dL/dg_t is the reverse cumulative sum
of that over t' >= t. Kernel 5 writes q . dq - k . dk per key tile; kernel 6 sums the tiles and runs the reverse
cumsum per chunk with a scalar carried across chunks. A fixed per-head decay [H] reaches here expanded to
[B, T, H]; autograd sums the per-token gradient back to [H].

Grouped q and k. q and k may hold G heads for the H heads of v (G dividing H; head h reads group h // (H / G), as
Mamba-2 shares B and C, Dao & Gu 2024, arXiv:2405.21060): every kernel reads its head's group in place (the
``G`` constexpr in the pointer arithmetic), so nothing is copied per head. Kernel 5 writes dq and dk per head
(the gate gradient needs each head's q . dq - k . dk), and the wrapper sums them over each group's heads.

Memory. The states entering every chunk, (chunks, H, Dk, Dv) float32, are written by the forward; they are kept
for the backward only while ``keep_chunk_states`` allows (no larger than q, k and v), else the backward runs
kernel 1 once more.

Dots run in IEEE float32 for float32/float64 inputs (tf32 for 16-bit inputs); everything accumulates in float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.ops.retention.chunk import keep_chunk_states
from zoo.ops.retention.naive import state_dtype


@triton.jit
def _chunk_states_fwd_kernel(
    k,  # (TT, G, K) packed tokens
    v,  # (TT, H, V)
    g,  # (TT, H) log-gates
    h0,  # (N, H, K, V) initial states, read if USE_H0
    hs,  # (NC, H, K, V) float32: the state entering every chunk
    ht,  # (N, H, K, V) float32: the final states
    z0,  # (N, H, K) initial decayed key sums, read if ROW_SUM and USE_H0
    zs,  # (NC, H, K) float32: the key sum entering every chunk, written if ROW_SUM
    zt,  # (N, H, K) float32: the final key sums, written if ROW_SUM
    cu_seqlens,  # (N + 1,) sequence boundaries in the packed token axis
    chunk_offsets,  # (N + 1,) index of each sequence's first chunk
    H: tl.constexpr,
    G: tl.constexpr,  # heads of q and k: groups of H // G heads
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    ROW_SUM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    i_g = i_h // (H // G)  # the group of q and k this head reads
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(T, BT)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_kv = o_k[:, None] * V + o_v[None, :]  # this program's (BK, BV) tile of a (K, V) state
    m_kv = m_k[:, None] & m_v[None, :]
    # the decayed key sum (the state of a value of ones) is stored by the first value tile only
    m_z = o_k < tl.where(i_v == 0, K, 0)

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if ROW_SUM and USE_H0:
        b_z += tl.load(z0 + (i_n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)

    for i_c in range(0, NT):
        tl.store(hs + ((c0 + i_c) * H + i_h) * K * V + p_kv, b_S, mask=m_kv)
        if ROW_SUM:
            tl.store(zs + ((c0 + i_c) * H + i_h) * K + o_k, b_z, mask=m_z)
        tok = bos + i_c * BT + o_t  # (BT,) packed token index
        m_t = (i_c * BT + o_t) < T
        # Padded rows load k = 0 and g = 0: they add nothing to the state and do not decay it.
        b_k = tl.load(
            k + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0
        ).to(tl.float32)  # (BT, BK)
        b_v = tl.load(
            v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
        ).to(tl.float32)  # (BT, BV)
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_b = tl.cumsum(b_g, axis=0)  # (BT,) log-decay from the chunk start
        b_last = tl.sum(b_g, axis=0)  # log-decay over the whole chunk
        b_k_to_end = b_k * tl.exp(b_last - b_b)[:, None]  # (BT, BK)
        b_S = b_S * tl.exp(b_last) + tl.dot(tl.trans(b_k_to_end), b_v, input_precision=PRECISION)
        if ROW_SUM:
            b_z = b_z * tl.exp(b_last) + tl.sum(b_k_to_end, axis=0)

    tl.store(ht + (i_n * H + i_h) * K * V + p_kv, b_S, mask=m_kv)
    if ROW_SUM:
        tl.store(zt + (i_n * H + i_h) * K + o_k, b_z, mask=m_z)


@triton.jit
def _chunk_output_fwd_kernel(
    q,  # (TT, G, K)
    k,  # (TT, G, K)
    v,  # (TT, H, V)
    g,  # (TT, H)
    o,  # (TT, H, V) output
    hs,  # (NC, H, K, V) float32: the state entering every chunk
    zs,  # (NC, H, K) float32: the key sum entering every chunk, read if ROW_SUM
    rs,  # (TT, H) float32: row sums of the scores, written if ROW_SUM
    cu_seqlens,  # (N + 1,)
    chunk_indices,  # (NC, 2): the sequence of every chunk and its index within that sequence
    scale,
    H: tl.constexpr,
    G: tl.constexpr,  # heads of q and k: groups of H // G heads
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ROW_SUM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # int64: offsets into the per-chunk states (NC * H * K * V numbers) can pass 2^31
    i_c, i_v, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_g = i_h // (H // G)  # the group of q and k this head reads
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T

    b_A = tl.zeros([BT, BT], dtype=tl.float32)  # Q K^T
    b_o = tl.zeros([BT, BV], dtype=tl.float32)  # Q S
    b_qz = tl.zeros([BT], dtype=tl.float32)  # q . z, z the key sum entering the chunk
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_S = tl.load(
            hs + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )  # (BK, BV)
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        b_o += tl.dot(b_q, b_S, input_precision=PRECISION)
        if ROW_SUM:
            b_z = tl.load(zs + (i_c * H + i_h) * K + o_k, mask=m_k, other=0.0)
            b_qz += tl.sum(b_q * b_z[None, :], axis=1)

    b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_b = tl.cumsum(b_g, axis=0)
    # Mask before exp: above the diagonal b_i - b_j > 0 and could overflow.
    b_D = tl.exp(tl.where(o_t[:, None] >= o_t[None, :], b_b[:, None] - b_b[None, :], float("-inf")))
    b_A = b_A * b_D  # (BT, BT) decayed scores
    b_v = tl.load(
        v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
    ).to(tl.float32)
    b_o = b_o * tl.exp(b_b)[:, None] + tl.dot(b_A, b_v, input_precision=PRECISION)
    tl.store(
        o + (tok[:, None] * H + i_h) * V + o_v[None, :],
        (b_o * scale).to(o.dtype.element_ty),
        mask=m_t[:, None] & m_v[None, :],
    )
    if ROW_SUM:
        b_rs = tl.sum(b_A, axis=1) + tl.exp(b_b) * b_qz
        # written by the first value tile only
        tl.store(rs + tok * H + i_h, b_rs * scale, mask=(i_t * BT + o_t) < tl.where(i_v == 0, T, 0))


@triton.jit
def _chunk_dstates_bwd_kernel(
    q,  # (TT, G, K)
    g,  # (TT, H)
    do,  # (TT, H, V) grad of the output
    dht,  # (N, H, K, V) grad of the final states, read if USE_DHT
    dhs,  # (NC, H, K, V) float32: grad of the state leaving every chunk
    dh0,  # (N, H, K, V) float32: grad of the initial states
    cu_seqlens,
    chunk_offsets,
    scale,
    H: tl.constexpr,
    G: tl.constexpr,  # heads of q and k: groups of H // G heads
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    i_g = i_h // (H // G)  # the group of q and k this head reads
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(T, BT)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    b_dS = tl.zeros([BK, BV], dtype=tl.float32)  # grad w.r.t. the state leaving the current chunk
    if USE_DHT:
        b_dS += tl.load(dht + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tl.store(dhs + ((c0 + i_c) * H + i_h) * K * V + p_kv, b_dS, mask=m_kv)
        tok = bos + i_c * BT + o_t
        m_t = (i_c * BT + o_t) < T
        b_q = tl.load(
            q + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0
        ).to(tl.float32)  # (BT, BK)
        b_do = tl.load(
            do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
        ).to(tl.float32)  # (BT, BV)
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_b = tl.cumsum(b_g, axis=0)
        b_last = tl.sum(b_g, axis=0)
        # step the state grad back across this chunk
        b_q_from_start = b_q * (tl.exp(b_b) * scale)[:, None]
        b_dS = b_dS * tl.exp(b_last) + tl.dot(tl.trans(b_q_from_start), b_do, input_precision=PRECISION)

    tl.store(dh0 + (i_n * H + i_h) * K * V + p_kv, b_dS, mask=m_kv)


@triton.jit
def _chunk_dv_bwd_kernel(
    q,  # (TT, G, K)
    k,  # (TT, G, K)
    g,  # (TT, H)
    do,  # (TT, H, V)
    dhs,  # (NC, H, K, V) float32: grad of the state leaving every chunk
    dv,  # (TT, H, V) float32
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    G: tl.constexpr,  # heads of q and k: groups of H // G heads
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_v, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_g = i_h // (H // G)  # the group of q and k this head reads
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T
    m_tv = m_t[:, None] & m_v[None, :]
    b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_b = tl.cumsum(b_g, axis=0)
    b_last = tl.sum(b_g, axis=0)

    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # (Q K^T)^T = K Q^T
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)  # K dS
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_dS = tl.load(
            dhs + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )  # (BK, BV)
        b_At += tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)
        b_dv += tl.dot(b_k, b_dS, input_precision=PRECISION)

    # the transposed decay, D^T_ji = D_ij = exp(b_i - b_j) for i >= j, with the scale
    b_Dt = tl.exp(tl.where(o_t[None, :] >= o_t[:, None], b_b[None, :] - b_b[:, None], float("-inf"))) * scale
    b_do = tl.load(do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_dv = b_dv * tl.exp(b_last - b_b)[:, None] + tl.dot(b_At * b_Dt, b_do, input_precision=PRECISION)
    tl.store(dv + (tok[:, None] * H + i_h) * V + o_v[None, :], b_dv, mask=m_tv)


@triton.jit
def _chunk_dqk_bwd_kernel(
    q,  # (TT, G, K)
    k,  # (TT, G, K)
    v,  # (TT, H, V)
    g,  # (TT, H)
    do,  # (TT, H, V)
    hs,  # (NC, H, K, V) float32: the state entering every chunk
    dhs,  # (NC, H, K, V) float32: grad of the state leaving every chunk
    dq,  # (TT, H, K) float32, per head (the caller sums a group's heads)
    dk,  # (TT, H, K) float32, per head
    dG,  # (TT, H, NK) float32: q . dq - k . dk over each key tile
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    G: tl.constexpr,  # heads of q and k: groups of H // G heads
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_g = i_h // (H // G)  # the group of q and k this head reads
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T
    m_tk = m_t[:, None] & m_k[None, :]
    hs_c = hs + (i_c * H + i_h) * K * V  # this chunk's (K, V) state and its grad
    dhs_c = dhs + (i_c * H + i_h) * K * V

    b_dP = tl.zeros([BT, BT], dtype=tl.float32)  # dO V^T
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # V dS^T
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        p_kv = o_k[:, None] * V + o_v[None, :]
        b_S = tl.load(hs_c + p_kv, mask=m_kv, other=0.0)  # (BK, BV)
        b_dS = tl.load(dhs_c + p_kv, mask=m_kv, other=0.0)  # (BK, BV)
        b_dP += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_dq += tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION)
        b_dk += tl.dot(b_v, tl.trans(b_dS), input_precision=PRECISION)

    b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_b = tl.cumsum(b_g, axis=0)
    b_last = tl.sum(b_g, axis=0)
    b_D = tl.exp(tl.where(o_t[:, None] >= o_t[None, :], b_b[:, None] - b_b[None, :], float("-inf"))) * scale
    b_dP = b_dP * b_D
    b_q = tl.load(q + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + (tok[:, None] * G + i_g) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_dq = b_dq * (tl.exp(b_b) * scale)[:, None] + tl.dot(b_dP, b_k, input_precision=PRECISION)
    b_dk = b_dk * tl.exp(b_last - b_b)[:, None] + tl.dot(tl.trans(b_dP), b_q, input_precision=PRECISION)
    tl.store(dq + (tok[:, None] * H + i_h) * K + o_k[None, :], b_dq, mask=m_tk)
    tl.store(dk + (tok[:, None] * H + i_h) * K + o_k[None, :], b_dk, mask=m_tk)
    # this key tile's share of dL/dG_t = q_t . dq_t - k_t . dk_t (0 on padded rows)
    b_dG = tl.sum(b_q * b_dq, axis=1) - tl.sum(b_k * b_dk, axis=1)
    tl.store(dG + (tok * H + i_h) * tl.cdiv(K, BK) + i_k, b_dG, mask=m_t)


@triton.jit
def _gate_grad_bwd_kernel(
    dG,  # (TT, H, NK) float32: q . dq - k . dk per key tile
    dG_final,  # (N, H) float32: <dS_T, S_T>, the final state's share at the last token, read if USE_FINAL
    dg,  # (TT, H) float32: grad of the log-gates
    cu_seqlens,
    H: tl.constexpr,
    BT: tl.constexpr,
    NK: tl.constexpr,
    USE_FINAL: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    NT = tl.cdiv(T, BT)
    o_t = tl.arange(0, BT)

    # the sum of dL/dG over all later tokens of this sequence: the part of the reverse cumsum from later chunks
    dg_later = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    if USE_FINAL:
        dg_later += tl.load(dG_final + i_n * H + i_h)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tok = bos + i_c * BT + o_t
        m_t = (i_c * BT + o_t) < T
        b_dG = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, NK):
            b_dG += tl.load(dG + (tok * H + i_h) * NK + i_k, mask=m_t, other=0.0)
        tl.store(dg + tok * H + i_h, tl.cumsum(b_dG, axis=0, reverse=True) + dg_later, mask=m_t)
        dg_later += tl.sum(b_dG, axis=0)


class LaunchConfig(NamedTuple):
    """Block sizes and launch options shared by all the kernels of one call."""

    BT: int  # tokens per chunk
    BK: int  # key channels per program (a tile of Dk)
    BV: int  # value channels per program (a tile of Dv)
    num_warps: int
    num_stages: int


# Shared memory one program may use, in bytes: an A100 allows 163 KB per block (an H100 227 KB); kept below the
# smaller with a margin, so that one configuration serves both.
SHARED_MEMORY_BUDGET = 160 * 1024
# float32 values of live blocks per thread: beyond about 64, the heaviest kernel (dq, dk) spills registers on
# sm_80 and sm_90 (measured with tests/ops/test_triton_gpu_compile.py; a thread has at most 255 registers, and
# the dots' operands and addresses need the rest).
REGISTER_BUDGET = 64
# Tokens per chunk at most: the (BT, BT) score blocks of 128-token chunks alone take 64 registers per thread.
MAX_CHUNK = 64


def _shared_memory_estimate(BT: int, BK: int, BV: int, num_stages: int) -> int:
    """Bytes the heaviest kernel stages in shared memory, an upper bound: the float32 operands of its dots (the
    (BT, BT) score block, two (BT, BK) or (BT, BV) tiles, two (BK, BV) state tiles), once per pipeline stage."""
    return 4 * (BT * BT + 2 * BT * max(BK, BV) + 2 * BK * BV) * num_stages


def _registers_estimate(BT: int, BK: int, BV: int, num_warps: int) -> float:
    """float32 values per thread in the blocks the dq/dk kernel keeps live: dO V^T (BT, BT), two (BT, BK)
    accumulators, the (BT, BV) tiles of V and dO, and the (BK, BV) tiles of S and dS."""
    return (BT * BT + 2 * BT * BK + 2 * BT * BV + 2 * BK * BV) / (32 * num_warps)


def launch_config(K: int, V: int, chunk_size: int) -> LaunchConfig:
    """Block sizes for head sizes K, V and chunks of ``chunk_size`` tokens (a power of 2 >= 16).

    The chunk is at most ``MAX_CHUNK`` tokens (the math does not depend on it); 8 warps for 64-token chunks, 4
    below. The key and value tiles start at 64 channels (or the head size, rounded up to a power of 2 >= 16, as
    ``tl.dot`` needs), and the larger one is halved until the live blocks fit ``REGISTER_BUDGET`` and the staged
    operands ``SHARED_MEMORY_BUDGET``: tiles of 32 at every head size from 32 up (compiled: 8-33 KB of shared
    memory per block, no spills).
    """
    BT = min(chunk_size, MAX_CHUNK)
    num_warps, num_stages = (8 if BT >= 64 else 4), 2
    BK = min(64, max(16, triton.next_power_of_2(K)))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    while max(BK, BV) > 16 and (
        _registers_estimate(BT, BK, BV, num_warps) > REGISTER_BUDGET
        or _shared_memory_estimate(BT, BK, BV, num_stages) > SHARED_MEMORY_BUDGET
    ):
        BK, BV = (BK // 2, BV) if BK >= BV else (BK, BV // 2)
    return LaunchConfig(BT=BT, BK=BK, BV=BV, num_warps=num_warps, num_stages=num_stages)


def _precision(dtype: torch.dtype) -> str:
    # tf32 would cost ~1e-3 relative error on float32 inputs; 16-bit inputs hold less than tf32 anyway.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _chunk_layout(cu_seqlens: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the chunks of every sequence are in the flat list of all chunks: ``chunk_offsets`` (N + 1,), the
    index of each sequence's first chunk, and ``chunk_indices`` (NC, 2), the sequence and in-sequence index of
    every chunk."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_chunks = (lengths + chunk_size - 1) // chunk_size
    chunk_offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), n_chunks)
    within = torch.arange(len(sequence), device=cu_seqlens.device) - chunk_offsets[sequence]
    return chunk_offsets, torch.stack([sequence, within], dim=1).to(torch.int32).contiguous()


def _chunk_states(k, v, g, h0, z0, cu_seqlens, chunk_offsets, n_chunks, cfg, row_sum):
    """Kernel 1: the state entering every chunk (NC, H, K, V) and the final states (N, H, K, V), float32; with
    ``row_sum`` also the key sums entering every chunk (NC, H, K) and the final ones (N, H, K)."""
    G, K = k.shape[2:]
    H, V = v.shape[2:]
    N = cu_seqlens.numel() - 1
    hs = k.new_empty(n_chunks, H, K, V, dtype=torch.float32)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32)
    zs = k.new_empty(n_chunks if row_sum else 0, H, K, dtype=torch.float32)
    zt = k.new_empty(N if row_sum else 0, H, K, dtype=torch.float32)
    grid = (N * H, triton.cdiv(K, cfg.BK), triton.cdiv(V, cfg.BV))
    _chunk_states_fwd_kernel[grid](
        k, v, g, ht if h0 is None else h0, hs, ht, zt if z0 is None else z0, zs, zt, cu_seqlens, chunk_offsets,
        H=H, G=G, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, USE_H0=h0 is not None, ROW_SUM=row_sum,
        PRECISION=_precision(k.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return hs, ht, zs, zt


class _ChunkRetention(torch.autograd.Function):
    """Packed retention: q, k (1, TT, G, K) with G dividing H; v (1, TT, H, V); g (1, TT, H); states (N, H, K, V)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, cu_seqlens, scale, chunk_size, row_sum):
        G, K = q.shape[2:]
        H, V = v.shape[2:]
        cfg = launch_config(K, V, chunk_size)
        chunk_offsets, chunk_indices = _chunk_layout(cu_seqlens, cfg.BT)
        n_chunks = chunk_indices.shape[0]
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = z0 = None
        if initial_state is not None:  # with row sums, the last column is the decayed key sum
            h0 = initial_state[..., :V].contiguous()
            z0 = initial_state[..., V].contiguous() if row_sum else None

        # 1. the state entering every chunk, walking the chunks in order
        hs, ht, zs, zt = _chunk_states(k, v, g, h0, z0, cu_seqlens, chunk_offsets, n_chunks, cfg, row_sum)
        # 2. every chunk's output from its state, all chunks in parallel
        o = torch.empty_like(v)  # (1, TT, H, V)
        rs = q.new_empty(v.shape[:-1] if row_sum else (0,), dtype=torch.float32)  # (1, TT, H)
        if n_chunks > 0:
            _chunk_output_fwd_kernel[(n_chunks, triton.cdiv(V, cfg.BV), H)](
                q, k, v, g, o, hs, zs, rs, cu_seqlens, chunk_indices, scale,
                H=H, G=G, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, ROW_SUM=row_sum, PRECISION=_precision(q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

        # The per-chunk states are kept only when a backward will need them (not under no_grad / inference), and
        # only while they are no larger than q, k and v (as in the torch op); otherwise the backward runs kernel 1
        # once more to recompute them.
        store_hs = any(ctx.needs_input_grad) and keep_chunk_states(K, V, cfg.BT)
        ctx.save_for_backward(
            q, k, v, g, hs if store_hs else None, ht, cu_seqlens, chunk_offsets, chunk_indices,
            None if store_hs else h0,
        )  # fmt: skip
        ctx.scale, ctx.cfg, ctx.row_sum = scale, cfg, row_sum
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        final = ht if not row_sum else torch.cat([ht, zt[..., None]], dim=-1)
        sums = rs.to(v.dtype) if row_sum else None
        if sums is not None:
            ctx.mark_non_differentiable(sums)
        return o, final.to(state_dtype(q.dtype)), sums

    @staticmethod
    def backward(ctx, do, dht, _drs):
        q, k, v, g, hs, ht, cu_seqlens, chunk_offsets, chunk_indices, h0 = ctx.saved_tensors
        TT, G, K = q.shape[1:]
        H, V = v.shape[2:]
        N = cu_seqlens.numel() - 1
        cfg, scale, precision = ctx.cfg, ctx.scale, _precision(q.dtype)
        n_chunks = chunk_indices.shape[0]
        NK, NV = triton.cdiv(K, cfg.BK), triton.cdiv(V, cfg.BV)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if hs is None:  # not kept by the forward (a backward runs only when gradients were needed)
            hs = _chunk_states(k, v, g, h0, None, cu_seqlens, chunk_offsets, n_chunks, cfg, False)[0]
        if dht is not None and ctx.row_sum:  # the key-sum column carries no gradient
            dht = dht[..., :V]
        dht = None if dht is None else dht.contiguous()
        do = torch.zeros_like(v) if do is None else do.contiguous()

        # 3. the gradient of the state leaving every chunk, walking the chunks in reverse
        dhs = q.new_empty(n_chunks, H, K, V, dtype=torch.float32)
        dh0 = q.new_empty(N, H, K, V, dtype=torch.float32)
        _chunk_dstates_bwd_kernel[(N * H, NK, NV)](
            q, g, do, dh0 if dht is None else dht, dhs, dh0, cu_seqlens, chunk_offsets, scale,
            H=H, G=G, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, USE_DHT=dht is not None, PRECISION=precision,
            **options,
        )  # fmt: skip
        # 4, 5. the per-chunk gradients, all chunks in parallel
        # every token is in a chunk, so the kernels write every element (when there is any chunk)
        alloc = torch.empty if n_chunks > 0 else torch.zeros
        new = functools.partial(alloc, dtype=torch.float32, device=q.device)
        # dq, dk per head of v; a group's heads are summed below
        dq, dk, dv = new(1, TT, H, K), new(1, TT, H, K), new(v.shape)
        dG = new(*g.shape, NK)  # (1, TT, H, NK)
        if n_chunks > 0:
            _chunk_dv_bwd_kernel[(n_chunks, NV, H)](
                q, k, g, do, dhs, dv, cu_seqlens, chunk_indices, scale,
                H=H, G=G, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, PRECISION=precision, **options,
            )  # fmt: skip
            _chunk_dqk_bwd_kernel[(n_chunks, NK, H)](
                q, k, v, g, do, hs, dhs, dq, dk, dG, cu_seqlens, chunk_indices, scale,
                H=H, G=G, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, PRECISION=precision, **options,
            )  # fmt: skip
        dg = None
        if ctx.needs_input_grad[3]:
            # 6. the gate gradient; the final state carries exp(G_T) on every term, so dL/dG_T gains <dS_T, S_T>
            dg = torch.empty(g.shape, dtype=torch.float32, device=q.device)
            dG_final = None if dht is None else (dht.float() * ht).sum((-2, -1))  # (N, H)
            _gate_grad_bwd_kernel[(N * H,)](
                dG, dg if dG_final is None else dG_final, dg, cu_seqlens,
                H=H, BT=cfg.BT, NK=NK, USE_FINAL=dG_final is not None, num_warps=1,
            )  # fmt: skip
            dg = dg.to(g.dtype)
        if G != H:
            dq, dk = (x.view(1, TT, G, H // G, K).sum(3) for x in (dq, dk))
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        if dh0 is not None and ctx.row_sum:
            dh0 = torch.nn.functional.pad(dh0, (0, 1))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0, None, None, None, None


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
    """Chunkwise retention on Triton kernels. q, k (B, T, H, Dk) or grouped (B, T, G, Dk), G dividing H (the kernels
    read head h's group h // (H / G) in place); v (B, T, H, Dv); g (B, T, H) log-gates.

    ``chunk_size`` must be a power of 2 and at least 16 (it is a Triton block size); chunks longer than
    ``MAX_CHUNK`` run as chunks of ``MAX_CHUNK`` tokens, the same math in fewer registers. With ``row_sum`` the
    output kernel also writes the row sums (B, T, H), without gradient, and the state gains the decayed key sum
    as a last column: (out, state, row_sums).
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"retention (triton): chunk_size={chunk_size}, expected a power of 2 >= 16")
    B, T = q.shape[:2]
    H, V = v.shape[2:]
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
