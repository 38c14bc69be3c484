"""Chunked vector-decay linear attention as Triton kernels, forward and backward, in ``torch.autograd.Function``.

Same math as ``chunk.py``: gated linear attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv:2312.06635, section 4: the chunkwise form with secondary chunking) and RWKV-6
(Peng et al. 2024, "Eagle and Finch", arXiv:2404.05892: the query reads S_{t-1}, plus a bonus u on the current
token). Within a chunk of BT tokens, with b the cumulative log-decay from the chunk start per key channel (b_C its
last row), c the query-side one (c = b for GLA, c_t = b_{t-1} for RWKV-6) and A the decayed intra-chunk scores

    A_ij = sum_k q_ik k_jk exp(c_ik - b_jk)   for j < i (and j = i for GLA),    A_ii = (q_i * u) . k_i (RWKV-6),

    forward   o  = scale * [ A V + (Q * exp(c)) S ]
              S <- exp(b_C) * S + (K * exp(b_C - b))^T V                      (exp(b_C) scales the rows of S)
    backward  dA = scale * dO V^T (on and below the diagonal)
              dV = scale * A^T dO + (K * exp(b_C - b)) dS
              dQ_ik = sum_j dA_ij k_jk exp(c_ik - b_jk) + scale * (dO S^T)_ik exp(c_ik)
              dK_jk = sum_i dA_ij q_ik exp(c_ik - b_jk) + (V dS^T)_jk exp(b_Ck - b_jk)
              dS <- exp(b_C) * dS + scale * (Q * exp(c))^T dO

with S the state entering the chunk and dS the gradient of the state leaving it (carried backwards; it ends as
the initial-state gradient).

Secondary chunking (GLA section 4.2). exp(c_i - b_j) <= 1 for j before i, but as a matmul it must be split into a
query and a key factor, and both stay <= 1 only around a reference point between j and i. So the chunk is cut into
sub-chunks of BC = 16 tokens: for the block of rows in sub-chunk a against the keys of earlier sub-chunks, the
reference r_a is b at the token before sub-chunk a, q_i exp(c_i - r_a) and k_j exp(r_a - b_j) are both <= 1, and
the block is one ``tl.dot``; inside sub-chunk a the (BC, BC) block is taken one key (or query) token at a time,
elementwise over the key channels. Every exponent taken is <= 0 (masked to -inf elsewhere before the exp), so
nothing overflows however strong the decay.

Kernels (tiled over BK key / BV value channels, as in ``zoo/ops/retention/triton.py``, so that shared memory and
registers fit sm_80 and sm_90 at head sizes 32..256):

    forward   1. _chunk_cumsum_kernel         grid (chunks, K/BK, H): b, the in-chunk cumulative log-decay.
              2. _chunk_states_fwd_kernel     grid (N*H, K/BK, V/BV): each program walks its sequence's chunks in
                 order with one (BK, BV) tile of the state and writes the tile entering every chunk (hs).
              3. _chunk_scores_fwd_kernel     grid (chunks * BT/BC, H): the rows of A of one sub-chunk, looping
                 over the key tiles.
              4. _chunk_output_fwd_kernel     grid (chunks, V/BV, H): every chunk at once, A V + (Q exp(c)) S.
    backward  5. _chunk_dstates_bwd_kernel    grid (N*H, K/BK, V/BV): the reverse walk, writing the gradient of the
                 state leaving every chunk (dhs) and ending with the initial-state gradient.
              6. _chunk_dscores_bwd_kernel    grid (chunks, H): dA, looping over the value tiles.
              7. _chunk_dv_bwd_kernel         grid (chunks, V/BV, H): dV, looping over the key tiles.
              8. _chunk_dqk_bwd_kernel        grid (chunks * BT/BC, K/BK, H): dQ and dK of one sub-chunk and key
                 tile (the bonus terms and du's per-token terms included), and q * dq - k * dk per key channel.
              9. _decay_grad_bwd_kernel       grid (N*H, K/BK): the log-decay gradient, a reverse cumulative sum
                 per sequence and key channel.

Gradient of the log-decays. Writing G_t for the cumulative log-decay of a sequence, outputs and states depend on G
only through q_i exp(C_i) and k_j exp(-G_j) (C = G for GLA, C_t = G_t - g_t for RWKV-6) and the final state through
exp(G_T), so dL/dG_t = q_t * dq_t - k_t * dk_t (+ sum_v dS_T * S_T at the last token), with dq, dk not counting the
bonus (whose terms cancel there anyway), and dL/dg_t is the reverse cumulative sum of that over t' >= t, minus
q_t * dq_t for RWKV-6 (C_t's own dependence on g_t).

Memory. Besides the per-chunk states (kept for the backward under the rule of retention's ``keep_chunk_states``,
else recomputed), the forward keeps b and the scores A, (TT, H, K) and (TT, H, BT) float32, for the backward.

Sequences are addressed through ``cu_seqlens``, so packed variable-length batches run in one launch, and a regular
(B, T) batch is B packed sequences of length T. Dots run in IEEE float32 for float32/float64 inputs (tf32 for
16-bit inputs); everything accumulates in float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.ops.gla.naive import state_dtype
from zoo.ops.retention.chunk import keep_chunk_states
from zoo.ops.retention.triton import _chunk_layout, _precision


@triton.jit
def _chunk_cumsum_kernel(
    g,  # (TT, H, K) log-decays
    gc,  # (TT, H, K) float32: their cumulative sum from the start of each chunk
    cu_seqlens,
    chunk_indices,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    i_c, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    tok = bos + i_t * BT + o_t
    m = ((i_t * BT + o_t) < T)[:, None] & (o_k < K)[None, :]
    p = (tok[:, None] * H + i_h) * K + o_k[None, :]
    b_g = tl.load(g + p, mask=m, other=0.0).to(tl.float32)
    tl.store(gc + p, tl.cumsum(b_g, axis=0), mask=m)


@triton.jit
def _chunk_states_fwd_kernel(
    k,  # (TT, H, K)
    v,  # (TT, H, V)
    gc,  # (TT, H, K) float32 in-chunk cumulative log-decays
    h0,  # (N, H, K, V) initial states, read if USE_H0
    hs,  # (NC, H, K, V) float32: the state entering every chunk
    ht,  # (N, H, K, V) float32: the final states
    cu_seqlens,
    chunk_offsets,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
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

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_c in range(0, NT):
        tl.store(hs + ((c0 + i_c) * H + i_h) * K * V + p_kv, b_S, mask=m_kv)
        tok = bos + i_c * BT + o_t
        m_t = (i_c * BT + o_t) < T
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)  # (BT, BK)
        b_b = tl.load(gc + p_tk, mask=m_tk, other=0.0)  # (BT, BK)
        b_v = tl.load(
            v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
        ).to(tl.float32)  # (BT, BV)
        last = bos + tl.minimum(i_c * BT + BT, T) - 1  # the chunk's last token
        b_last = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0.0)  # (BK,)
        # masked before the exp: past the end b is 0 and b_last - b could overflow
        b_k_to_end = b_k * tl.exp(tl.where(m_t[:, None], b_last[None, :] - b_b, float("-inf")))
        b_S = b_S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(b_k_to_end), b_v, input_precision=PRECISION)

    tl.store(ht + (i_n * H + i_h) * K * V + p_kv, b_S, mask=m_kv)


@triton.jit
def _chunk_scores_fwd_kernel(
    q,  # (TT, H, K)
    k,  # (TT, H, K)
    g,  # (TT, H, K) log-decays, read if BONUS (c = b - g)
    gc,  # (TT, H, K) float32
    u,  # (H, K) bonus, read if BONUS
    A,  # (TT, H, BT) float32: the decayed scores of every token against its chunk's tokens
    cu_seqlens,
    chunk_indices,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BONUS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_cs, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_c, i_s = i_cs // (BT // BC), i_cs % (BT // BC)  # the chunk, the sub-chunk in it
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos

    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    tok = bos + i_t * BT + o_t  # the chunk's tokens (keys)
    m_t = (i_t * BT + o_t) < T
    start = i_s * BC  # the sub-chunk's first row in the chunk
    tok_a = bos + i_t * BT + start + o_c  # the sub-chunk's tokens (queries)
    m_a = (i_t * BT + start + o_c) < T
    # the reference: b at the token before the sub-chunk (0 before the chunk); a sub-chunk past the sequence's end
    # takes its last token instead, so that nothing is read from another sequence
    n_valid = tl.minimum(BT, T - i_t * BT)
    tok_r = bos + i_t * BT + tl.maximum(tl.minimum(start, n_valid) - 1, 0)
    earlier = (o_t < start) & m_t  # keys in earlier sub-chunks

    b_A = tl.zeros([BC, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_a = (tok_a[:, None] * H + i_h) * K + o_k[None, :]
        m_ak = m_a[:, None] & m_k[None, :]
        b_q = tl.load(q + p_a, mask=m_ak, other=0.0).to(tl.float32)  # (BC, BK)
        b_c = tl.load(gc + p_a, mask=m_ak, other=0.0)
        if BONUS:
            b_c -= tl.load(g + p_a, mask=m_ak, other=0.0).to(tl.float32)
        b_r = tl.load(
            gc + (tok_r * H + i_h) * K + o_k, mask=o_k < tl.where(start > 0, K, 0), other=0.0
        )  # (BK,)
        p_t = (tok[:, None] * H + i_h) * K + o_k[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + p_t, mask=m_tk, other=0.0).to(tl.float32)  # (BT, BK)
        b_b = tl.load(gc + p_t, mask=m_tk, other=0.0)
        # 1. the keys of earlier sub-chunks: one dot, both factors <= 1
        b_kr = b_k * tl.exp(tl.where(earlier[:, None], b_r[None, :] - b_b, float("-inf")))
        b_qr = b_q * tl.exp(tl.where(m_a[:, None], b_c - b_r[None, :], float("-inf")))
        b_A += tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
        # 2. the sub-chunk's own keys, one at a time
        if BONUS:
            b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        for j in range(0, BC):
            tok_j = bos + i_t * BT + start + j
            m_j = o_k < tl.where((i_t * BT + start + j) < T, K, 0)
            b_kj = tl.load(k + (tok_j * H + i_h) * K + o_k, mask=m_j, other=0.0).to(tl.float32)  # (BK,)
            b_bj = tl.load(gc + (tok_j * H + i_h) * K + o_k, mask=m_j, other=0.0)
            if BONUS:
                below = (o_c > j) & m_a  # RWKV-6 reads S_{t-1}: strictly earlier keys
            else:
                below = (o_c >= j) & m_a
            decay = tl.exp(tl.where(below[:, None], b_c - b_bj[None, :], float("-inf")))
            b_col = tl.sum(b_q * b_kj[None, :] * decay, axis=1)  # (BC,)
            if BONUS:
                b_col += tl.where(o_c == j, tl.sum(b_q * (b_u * b_kj)[None, :], axis=1), 0.0)
            b_A += tl.where(o_t[None, :] == start + j, b_col[:, None], 0.0)

    tl.store(A + (tok_a[:, None] * H + i_h) * BT + o_t[None, :], b_A, mask=m_a[:, None])


@triton.jit
def _chunk_output_fwd_kernel(
    q,  # (TT, H, K)
    v,  # (TT, H, V)
    g,  # (TT, H, K), read if BONUS
    gc,  # (TT, H, K) float32
    A,  # (TT, H, BT) float32
    o,  # (TT, H, V) output
    hs,  # (NC, H, K, V) float32
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BONUS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_v, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
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

    b_o = tl.zeros([BT, BV], dtype=tl.float32)  # (Q exp(c)) S
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_c = tl.load(gc + p_tk, mask=m_tk, other=0.0)
        if BONUS:
            b_c -= tl.load(g + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_S = tl.load(
            hs + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )  # (BK, BV)
        b_o += tl.dot(b_q * tl.exp(b_c), b_S, input_precision=PRECISION)

    b_A = tl.load(A + (tok[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)  # (BT, BT)
    b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_o += tl.dot(b_A, b_v, input_precision=PRECISION)
    tl.store(o + (tok[:, None] * H + i_h) * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _chunk_dstates_bwd_kernel(
    q,  # (TT, H, K)
    g,  # (TT, H, K), read if BONUS
    gc,  # (TT, H, K) float32
    do,  # (TT, H, V)
    dht,  # (N, H, K, V) grad of the final states, read if USE_DHT
    dhs,  # (NC, H, K, V) float32: grad of the state leaving every chunk
    dh0,  # (N, H, K, V) float32: grad of the initial states
    cu_seqlens,
    chunk_offsets,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BONUS: tl.constexpr,
    USE_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
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

    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tl.store(dhs + ((c0 + i_c) * H + i_h) * K * V + p_kv, b_dS, mask=m_kv)
        tok = bos + i_c * BT + o_t
        m_t = (i_c * BT + o_t) < T
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)  # (BT, BK)
        b_c = tl.load(gc + p_tk, mask=m_tk, other=0.0)
        if BONUS:
            b_c -= tl.load(g + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_do = tl.load(
            do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
        ).to(tl.float32)  # (BT, BV)
        last = bos + tl.minimum(i_c * BT + BT, T) - 1
        b_last = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_q_from_start = b_q * tl.exp(b_c) * scale
        b_dS = b_dS * tl.exp(b_last)[:, None] + tl.dot(
            tl.trans(b_q_from_start), b_do, input_precision=PRECISION
        )

    tl.store(dh0 + (i_n * H + i_h) * K * V + p_kv, b_dS, mask=m_kv)


@triton.jit
def _chunk_dscores_bwd_kernel(
    v,  # (TT, H, V)
    do,  # (TT, H, V)
    dA,  # (TT, H, BT) float32: scale * dO V^T on and below the diagonal
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    o_t = tl.arange(0, BT)
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA * scale, 0.0)
    tl.store(dA + (tok[:, None] * H + i_h) * BT + o_t[None, :], b_dA, mask=m_t[:, None])


@triton.jit
def _chunk_dv_bwd_kernel(
    k,  # (TT, H, K)
    gc,  # (TT, H, K) float32
    A,  # (TT, H, BT) float32
    do,  # (TT, H, V)
    dhs,  # (NC, H, K, V) float32
    dv,  # (TT, H, V) float32
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_v, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
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
    last = bos + tl.minimum(i_t * BT + BT, T) - 1

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)  # (K exp(b_C - b)) dS
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_b = tl.load(gc + p_tk, mask=m_tk, other=0.0)
        b_last = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_dS = tl.load(
            dhs + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )  # (BK, BV)
        b_k_to_end = b_k * tl.exp(tl.where(m_t[:, None], b_last[None, :] - b_b, float("-inf")))
        b_dv += tl.dot(b_k_to_end, b_dS, input_precision=PRECISION)

    b_A = tl.load(A + (tok[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    b_do = tl.load(do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_dv += tl.dot(tl.trans(b_A), b_do, input_precision=PRECISION) * scale
    tl.store(dv + (tok[:, None] * H + i_h) * V + o_v[None, :], b_dv, mask=m_tv)


@triton.jit
def _chunk_dqk_bwd_kernel(
    q,  # (TT, H, K)
    k,  # (TT, H, K)
    v,  # (TT, H, V)
    g,  # (TT, H, K), read if BONUS
    gc,  # (TT, H, K) float32
    u,  # (H, K), read if BONUS
    do,  # (TT, H, V)
    dA,  # (TT, H, BT) float32
    hs,  # (NC, H, K, V) float32
    dhs,  # (NC, H, K, V) float32
    dq,  # (TT, H, K) float32
    dk,  # (TT, H, K) float32
    dG,  # (TT, H, K) float32: q * dq - k * dk without the bonus
    dD,  # (TT, H, K) float32: -q * dq without the bonus (RWKV-6's c_t = b_t - g_t), written if BONUS
    du,  # (TT, H, K) float32: each token's share of du, written if BONUS
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BONUS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_cs, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_c, i_s = i_cs // (BT // BC), i_cs % (BT // BC)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos

    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T
    start = i_s * BC
    tok_a = bos + i_t * BT + start + o_c
    m_a = (i_t * BT + start + o_c) < T
    m_ak = m_a[:, None] & m_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    p_a = (tok_a[:, None] * H + i_h) * K + o_k[None, :]
    p_t = (tok[:, None] * H + i_h) * K + o_k[None, :]
    n_valid = tl.minimum(BT, T - i_t * BT)  # tokens of the chunk inside the sequence
    last = bos + i_t * BT + n_valid - 1

    b_q = tl.load(q + p_a, mask=m_ak, other=0.0).to(tl.float32)  # (BC, BK)
    b_k = tl.load(k + p_a, mask=m_ak, other=0.0).to(tl.float32)
    b_b = tl.load(gc + p_a, mask=m_ak, other=0.0)
    b_c = b_b
    if BONUS:
        b_c = b_b - tl.load(g + p_a, mask=m_ak, other=0.0).to(tl.float32)
    b_last = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0.0)  # (BK,)

    # 1. through the states: dO S^T and V dS^T, looping over the value tiles
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_av = m_a[:, None] & m_v[None, :]
        p_av = (tok_a[:, None] * H + i_h) * V + o_v[None, :]
        b_do = tl.load(do + p_av, mask=m_av, other=0.0).to(tl.float32)  # (BC, BV)
        b_v = tl.load(v + p_av, mask=m_av, other=0.0).to(tl.float32)
        p_kv = (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_S = tl.load(hs + p_kv, mask=m_kv, other=0.0)  # (BK, BV)
        b_dS = tl.load(dhs + p_kv, mask=m_kv, other=0.0)
        b_dq += tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION)
        b_dk += tl.dot(b_v, tl.trans(b_dS), input_precision=PRECISION)
    b_dq = b_dq * tl.exp(b_c) * scale
    b_dk = b_dk * tl.exp(tl.where(m_a[:, None], b_last[None, :] - b_b, float("-inf")))

    # 2. dq from the keys of earlier sub-chunks, reference r = b before the sub-chunk (as in the forward)
    tok_r = bos + i_t * BT + tl.maximum(tl.minimum(start, n_valid) - 1, 0)
    b_r = tl.load(gc + (tok_r * H + i_h) * K + o_k, mask=o_k < tl.where(start > 0, K, 0), other=0.0)
    b_kt = tl.load(k + p_t, mask=m_tk, other=0.0).to(tl.float32)  # (BT, BK)
    b_bt = tl.load(gc + p_t, mask=m_tk, other=0.0)
    b_kr = b_kt * tl.exp(tl.where(((o_t < start) & m_t)[:, None], b_r[None, :] - b_bt, float("-inf")))
    b_dA_rows = tl.load(dA + (tok_a[:, None] * H + i_h) * BT + o_t[None, :], mask=m_a[:, None], other=0.0)
    b_dq += tl.dot(b_dA_rows, b_kr, input_precision=PRECISION) * tl.exp(
        tl.where(m_a[:, None], b_c - b_r[None, :], float("-inf"))
    )
    # 3. dk from the queries of later sub-chunks, reference r = b at the sub-chunk's last token
    tok_e = bos + i_t * BT + tl.minimum(start + BC, n_valid) - 1
    b_e = tl.load(gc + (tok_e * H + i_h) * K + o_k, mask=m_k, other=0.0)
    b_qt = tl.load(q + p_t, mask=m_tk, other=0.0).to(tl.float32)
    b_ct = b_bt
    if BONUS:
        b_ct = b_bt - tl.load(g + p_t, mask=m_tk, other=0.0).to(tl.float32)
    later = (o_t >= start + BC) & m_t
    b_qr = b_qt * tl.exp(tl.where(later[:, None], b_ct - b_e[None, :], float("-inf")))
    b_dA_cols = tl.load(
        dA + (tok[:, None] * H + i_h) * BT + start + o_c[None, :], mask=later[:, None], other=0.0
    )  # (BT, BC)
    b_dk += tl.dot(tl.trans(b_dA_cols), b_qr, input_precision=PRECISION) * tl.exp(
        tl.where(m_a[:, None], b_e[None, :] - b_b, float("-inf"))
    )
    # 4. inside the sub-chunk, one token at a time: as the key of earlier-or-equal queries (dq), as the query of
    # earlier keys (dk)
    for j in range(0, BC):
        tok_j = bos + i_t * BT + start + j
        # the scalar condition as a vector mask (masks are tensors of the block's shape)
        valid_j = o_c < tl.where((i_t * BT + start + j) < T, BC, 0)
        m_j = o_k < tl.where((i_t * BT + start + j) < T, K, 0)
        p_j = (tok_j * H + i_h) * K + o_k
        b_kj = tl.load(k + p_j, mask=m_j, other=0.0).to(tl.float32)
        b_qj = tl.load(q + p_j, mask=m_j, other=0.0).to(tl.float32)
        b_bj = tl.load(gc + p_j, mask=m_j, other=0.0)
        b_cj = b_bj
        if BONUS:
            b_cj = b_bj - tl.load(g + p_j, mask=m_j, other=0.0).to(tl.float32)
            rows_after = (o_c > j) & m_a  # queries reading key j
            rows_before = (o_c < j) & m_a & valid_j  # keys read by query j
        else:
            rows_after = (o_c >= j) & m_a
            rows_before = (o_c <= j) & m_a & valid_j
        b_dA_col = tl.load(dA + (tok_a * H + i_h) * BT + start + j, mask=m_a, other=0.0)  # dA[i, j], (BC,)
        b_dA_row = tl.load(
            dA + (tok_j * H + i_h) * BT + start + o_c, mask=m_a & valid_j, other=0.0
        )  # dA[j, i]
        b_dq += (b_dA_col[:, None] * b_kj[None, :]) * tl.exp(
            tl.where(rows_after[:, None], b_c - b_bj[None, :], float("-inf"))
        )
        b_dk += (b_dA_row[:, None] * b_qj[None, :]) * tl.exp(
            tl.where(rows_before[:, None], b_cj[None, :] - b_b, float("-inf"))
        )

    # 5. the log-decay gradient's per-token terms, then the bonus
    tl.store(dG + p_a, b_q * b_dq - b_k * b_dk, mask=m_ak)
    if BONUS:
        tl.store(dD + p_a, -b_q * b_dq, mask=m_ak)
        b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_dA_diag = tl.load(dA + (tok_a * H + i_h) * BT + start + o_c, mask=m_a, other=0.0)[:, None]
        b_dq += b_dA_diag * b_u[None, :] * b_k
        b_dk += b_dA_diag * b_u[None, :] * b_q
        tl.store(du + p_a, b_dA_diag * b_q * b_k, mask=m_ak)
    tl.store(dq + p_a, b_dq, mask=m_ak)
    tl.store(dk + p_a, b_dk, mask=m_ak)


@triton.jit
def _decay_grad_bwd_kernel(
    dG,  # (TT, H, K) float32
    dD,  # (TT, H, K) float32, read if BONUS
    dG_final,  # (N, H, K) float32: sum_v dS_T * S_T, read if USE_FINAL
    dg,  # (TT, H, K) float32
    cu_seqlens,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BONUS: tl.constexpr,
    USE_FINAL: tl.constexpr,
):
    i_nh, i_k = tl.program_id(0), tl.program_id(1)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    NT = tl.cdiv(T, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K

    # the sum of dL/dG over all later tokens of this sequence, per key channel
    b_later = tl.zeros([BK], dtype=tl.float32)
    if USE_FINAL:
        b_later += tl.load(dG_final + (i_n * H + i_h) * K + o_k, mask=m_k, other=0.0)
    for i_r in range(0, NT):
        i_c = NT - 1 - i_r
        tok = bos + i_c * BT + o_t
        m = ((i_c * BT + o_t) < T)[:, None] & m_k[None, :]
        p = (tok[:, None] * H + i_h) * K + o_k[None, :]
        b_dG = tl.load(dG + p, mask=m, other=0.0)
        b_dg = tl.cumsum(b_dG, axis=0, reverse=True) + b_later[None, :]
        if BONUS:
            b_dg += tl.load(dD + p, mask=m, other=0.0)
        tl.store(dg + p, b_dg, mask=m)
        b_later += tl.sum(b_dG, axis=0)


class LaunchConfig(NamedTuple):
    """Block sizes and launch options shared by the kernels of one call."""

    BT: int  # tokens per chunk
    BC: int  # tokens per sub-chunk
    BK: int  # key channels per program
    BV: int  # value channels per program
    num_warps: int  # of the whole-chunk kernels; the sub-chunk ones run 4 warps
    num_stages: int


# Shared memory one program may use: below an A100's 163 KB per block (an H100 has 227 KB), one configuration for
# both. Registers: float32 values of live blocks per thread, as for retention's kernels (zoo/ops/retention/triton.py).
SHARED_MEMORY_BUDGET = 160 * 1024
REGISTER_BUDGET = 64
MAX_CHUNK = 64
SUB_CHUNK = 16
SUB_CHUNK_WARPS = 4


def _shared_memory_estimate(BT: int, BK: int, BV: int, num_stages: int) -> int:
    """Bytes the heaviest whole-chunk kernel stages, an upper bound: the (BT, BT) scores, two (BT, BK) or (BT, BV)
    tiles and two (BK, BV) state tiles, float32, once per pipeline stage."""
    return 4 * (BT * BT + 2 * BT * max(BK, BV) + 2 * BK * BV) * num_stages


def _registers_estimate(BT: int, BC: int, BK: int, BV: int, num_warps: int) -> float:
    """float32 values per thread live in the heaviest kernel: the output kernel's (BT, BT) scores, (BT, BK) query
    tile, (BK, BV) state and (BT, BV) value and output tiles, or the dq/dk kernel's (BT, BK) key and query tiles,
    (BC, BT) scores and four (BC, BK) blocks over 4 warps."""
    whole = (BT * BT + 2 * BT * BK + BK * BV + 2 * BT * BV) / (32 * num_warps)
    sub = (2 * BT * BK + BC * BT + 4 * BC * BK + 2 * BK * BV + 2 * BC * BV) / (32 * SUB_CHUNK_WARPS)
    return max(whole, sub)


def launch_config(K: int, V: int, chunk_size: int) -> LaunchConfig:
    """Block sizes for head sizes K, V and chunks of ``chunk_size`` tokens (a power of 2 >= 16).

    The chunk is at most ``MAX_CHUNK`` tokens, cut into sub-chunks of ``SUB_CHUNK``; 8 warps for 64-token chunks, 4
    below. The key and value tiles start at 64 channels (or the head size rounded up to a power of 2 >= 16) and the
    larger is halved until the live blocks fit ``REGISTER_BUDGET`` and the staged operands
    ``SHARED_MEMORY_BUDGET``: BK 16 and BV 32 at 64-token chunks and head sizes 32 to 256 (compiled: at most 25 KB
    of shared memory per block on sm_80 and sm_90, no spills but 4 bytes in one kernel on sm_80 at Dk 32).
    """
    BT = min(chunk_size, MAX_CHUNK)
    BC = min(SUB_CHUNK, BT)
    num_warps, num_stages = (8 if BT >= 64 else 4), 2
    BK = min(64, max(16, triton.next_power_of_2(K)))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    while max(BK, BV) > 16 and (
        _registers_estimate(BT, BC, BK, BV, num_warps) > REGISTER_BUDGET
        or _shared_memory_estimate(BT, BK, BV, num_stages) > SHARED_MEMORY_BUDGET
    ):
        BK, BV = (BK // 2, BV) if BK >= BV else (BK, BV // 2)
    return LaunchConfig(BT=BT, BC=BC, BK=BK, BV=BV, num_warps=num_warps, num_stages=num_stages)


def _chunk_states(k, v, gc, h0, cu_seqlens, chunk_offsets, n_chunks, cfg):
    """Kernel 2: the state entering every chunk (NC, H, K, V) and the final states (N, H, K, V), float32."""
    _, _, H, K = k.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    hs = k.new_empty(n_chunks, H, K, V, dtype=torch.float32)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32)
    _chunk_states_fwd_kernel[(N * H, triton.cdiv(K, cfg.BK), triton.cdiv(V, cfg.BV))](
        k, v, gc, ht if h0 is None else h0, hs, ht, cu_seqlens, chunk_offsets,
        H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, USE_H0=h0 is not None, PRECISION=_precision(k.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return hs, ht


class _ChunkGLA(torch.autograd.Function):
    """Packed GLA / RWKV-6: q, k, g (1, TT, H, K); v (1, TT, H, V); u (H, K) or None; states (N, H, K, V)."""

    @staticmethod
    def forward(ctx, q, k, v, g, u, initial_state, cu_seqlens, scale, chunk_size):
        _, TT, H, K = q.shape
        V = v.shape[-1]
        cfg = launch_config(K, V, chunk_size)
        chunk_offsets, chunk_indices = _chunk_layout(cu_seqlens, cfg.BT)
        n_chunks = chunk_indices.shape[0]
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        u = None if u is None else u.contiguous()
        h0 = None if initial_state is None else initial_state.contiguous()
        bonus, precision = u is not None, _precision(q.dtype)
        NK, NV, NS = triton.cdiv(K, cfg.BK), triton.cdiv(V, cfg.BV), cfg.BT // cfg.BC
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

        # 1. the in-chunk cumulative log-decays
        gc = torch.zeros(g.shape, dtype=torch.float32, device=q.device)
        if n_chunks > 0:
            _chunk_cumsum_kernel[(n_chunks, NK, H)](
                g, gc, cu_seqlens, chunk_indices, H=H, K=K, BT=cfg.BT, BK=cfg.BK, num_warps=4
            )
        # 2. the state entering every chunk, walking the chunks in order
        hs, ht = _chunk_states(k, v, gc, h0, cu_seqlens, chunk_offsets, n_chunks, cfg)
        # 3, 4. the scores inside every chunk, then the outputs, all chunks in parallel
        A = q.new_zeros(1, TT, H, cfg.BT, dtype=torch.float32)
        o = torch.empty_like(v)
        if n_chunks > 0:
            _chunk_scores_fwd_kernel[(n_chunks * NS, H)](
                q, k, g, gc, q if u is None else u, A, cu_seqlens, chunk_indices,
                H=H, K=K, BT=cfg.BT, BC=cfg.BC, BK=cfg.BK, BONUS=bonus, PRECISION=precision,
                num_warps=SUB_CHUNK_WARPS, num_stages=cfg.num_stages,
            )  # fmt: skip
            _chunk_output_fwd_kernel[(n_chunks, NV, H)](
                q, v, g, gc, A, o, hs, cu_seqlens, chunk_indices, scale,
                H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, BONUS=bonus, PRECISION=precision, **options,
            )  # fmt: skip

        # as retention: the per-chunk states are kept for the backward while no larger than q, k and v
        store_hs = any(ctx.needs_input_grad) and keep_chunk_states(K, V, cfg.BT)
        ctx.save_for_backward(
            q, k, v, g, u, gc, A, hs if store_hs else None, ht, cu_seqlens, chunk_offsets, chunk_indices,
            None if store_hs else h0,
        )  # fmt: skip
        ctx.scale, ctx.cfg = scale, cfg
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        final = ht.to(state_dtype(q.dtype))
        if h0 is not None:  # an empty sequence passes its initial state on exactly, not rounded to float32
            final = torch.where(
                (cu_seqlens[1:] == cu_seqlens[:-1])[:, None, None, None], h0.to(final.dtype), final
            )
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, u, gc, A, hs, ht, cu_seqlens, chunk_offsets, chunk_indices, h0 = ctx.saved_tensors
        _, TT, H, K = q.shape
        V = v.shape[-1]
        N = cu_seqlens.numel() - 1
        cfg, scale, precision = ctx.cfg, ctx.scale, _precision(q.dtype)
        bonus = u is not None
        n_chunks = chunk_indices.shape[0]
        NK, NV, NS = triton.cdiv(K, cfg.BK), triton.cdiv(V, cfg.BV), cfg.BT // cfg.BC
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if hs is None:
            hs = _chunk_states(k, v, gc, h0, cu_seqlens, chunk_offsets, n_chunks, cfg)[0]
        dht = None if dht is None else dht.contiguous()
        do = torch.zeros_like(v) if do is None else do.contiguous()

        # 5. the gradient of the state leaving every chunk, walking the chunks in reverse
        dhs = q.new_empty(n_chunks, H, K, V, dtype=torch.float32)
        dh0 = q.new_empty(N, H, K, V, dtype=torch.float32)
        _chunk_dstates_bwd_kernel[(N * H, NK, NV)](
            q, g, gc, do, dh0 if dht is None else dht, dhs, dh0, cu_seqlens, chunk_offsets, scale,
            H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, BONUS=bonus, USE_DHT=dht is not None,
            PRECISION=precision, **options,
        )  # fmt: skip
        # 6-8. the per-chunk gradients, all chunks in parallel (every element written when there is a chunk)
        alloc = torch.empty if n_chunks > 0 else torch.zeros
        new = functools.partial(alloc, dtype=torch.float32, device=q.device)
        dA = new(1, TT, H, cfg.BT)
        dq, dk, dv, dG = new(q.shape), new(k.shape), new(v.shape), new(g.shape)
        dD = new(g.shape) if bonus else dG
        du_tok = new(g.shape) if bonus else dG
        if n_chunks > 0:
            _chunk_dscores_bwd_kernel[(n_chunks, H)](
                v, do, dA, cu_seqlens, chunk_indices, scale,
                H=H, V=V, BT=cfg.BT, BV=cfg.BV, PRECISION=precision, **options,
            )  # fmt: skip
            _chunk_dv_bwd_kernel[(n_chunks, NV, H)](
                k, gc, A, do, dhs, dv, cu_seqlens, chunk_indices, scale,
                H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, PRECISION=precision, **options,
            )  # fmt: skip
            _chunk_dqk_bwd_kernel[(n_chunks * NS, NK, H)](
                q, k, v, g, gc, q if u is None else u, do, dA, hs, dhs, dq, dk, dG, dD, du_tok,
                cu_seqlens, chunk_indices, scale,
                H=H, K=K, V=V, BT=cfg.BT, BC=cfg.BC, BK=cfg.BK, BV=cfg.BV, BONUS=bonus, PRECISION=precision,
                num_warps=SUB_CHUNK_WARPS, num_stages=cfg.num_stages,
            )  # fmt: skip
        dg = None
        if ctx.needs_input_grad[3]:
            # 9. the log-decay gradient; the final state carries exp(G_T), so dL/dG_T gains sum_v dS_T * S_T
            dg = torch.empty(g.shape, dtype=torch.float32, device=q.device)
            dG_final = None if dht is None else (dht.float() * ht).sum(-1)  # (N, H, K)
            _decay_grad_bwd_kernel[(N * H, NK)](
                dG, dD, dg if dG_final is None else dG_final, dg, cu_seqlens,
                H=H, K=K, BT=cfg.BT, BK=cfg.BK, BONUS=bonus, USE_FINAL=dG_final is not None, num_warps=4,
            )  # fmt: skip
            dg = dg.to(g.dtype)
        du = du_tok.sum((0, 1)).to(u.dtype) if bonus and ctx.needs_input_grad[4] else None
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, du, dh0, None, None, None


def triton_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA (``u`` None) or RWKV-6 (``u`` (H, K)) on Triton kernels. q, k, g (B, T, H, K); v (B, T, H, V);
    states (B, H, K, V), or one per packed sequence (``cu_seqlens``, B == 1).

    ``chunk_size`` must be a power of 2 and at least 16 (a Triton block size); chunks longer than ``MAX_CHUNK`` run
    as chunks of ``MAX_CHUNK`` tokens, the same math in fewer registers.
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"gla (triton): chunk_size={chunk_size}, expected a power of 2 >= 16")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        # a regular batch is B packed sequences of length T
        cu = torch.arange(0, B + 1, device=q.device, dtype=torch.int64) * T
        packed = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g))
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        packed = (q, k, v, g)
    o, ht = _ChunkGLA.apply(*packed, u, initial_state, cu.contiguous(), float(scale), chunk_size)
    return o.reshape(B, T, H, V), (ht if output_final_state else None)
