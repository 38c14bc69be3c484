r"""The generalised delta rule as Triton kernels, forward and backward, in ``torch.autograd.Function``.

RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution", arXiv:2503.14456): the
same chunked WY / UT form as ``chunk.py`` (see its docstring), with the state stored transposed, S (Dk, Dv), and the
scale folded into q:

    S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T,     D_t = diag(exp(g_t)),     o_t = S_t^T q_t.

Per chunk of BT tokens entering with state S_0, with G the chunk-local cumulative log-decay (G_C at its last
token), the decayed pair matrices (strictly lower A_ak, A_ab with G_{t-1}; lower A_qk, A_qb with G_t, diagonal
included)

    A_xy[t, i] = sum_c x_t[c] y_i[c] exp(G_t'[c] - G_i[c]),

the rows Ã = a e^{G_{t-1}}, Q̃ = q e^{G_t}, K̃ = k e^{G_C - G}, B̃ = b e^{G_C - G}, γ = e^{G_C}, and the inverse
T = (I - A_ab)^{-1} (unit lower triangular),

    forward   U = T (A_ak V + Ã S_0)           (the rows u_t = S_{t-1}^T a_t)       = W + P S_0, W = T A_ak V, P = T Ã
              O = A_qk V + A_qb U + Q̃ S_0
              S_C = γ * S_0 + K̃^T V + B̃^T U                                       (γ scales the rows of S_0)
    backward  dU = B̃ dS_C + A_qb^T dO,   dR = T^T dU,
              dS_0 = γ * dS_C + Q̃^T dO + P^T dU                                  (carried to the previous chunk)
              dV = A_qk^T dO + K̃ dS_C + A_ak^T dR
              dA_qk = dO V^T, dA_qb = dO U^T, dA_ak = dR V^T, dA_ab = dR U^T   (masked to their triangles)
              dQ̃ = dO S_0^T, dK̃ = V dS_C^T, dB̃ = U dS_C^T, dÃ = dR S_0^T, dγ = rowsum(dS_C * S_0)

and the pair matrices pass their gradients to their row and column vectors elementwise per key channel,
dx_t = sum_i dA[t, i] y_i e^{..}, dy_i = sum_t dA[t, i] x_t e^{..}. The log-decays enter only through G: a row at G_t
gives dG_t += x_t * dx_t, a column at G_i gives dG_i -= y_i * dy_i, and likewise for the rows Q̃, Ã, K̃, B̃ and γ;
dg is then a reverse cumulative sum inside the chunk (G is chunk-local), with G_{t-1} = G_t - g_t and G_C the sum
of the chunk's g.

Stability. Every exponent is a later G minus an earlier one, or G_C minus G: <= 0, masked to -inf outside its
triangle before the exp, so nothing overflows however strong the decay. The pair matrices are not matmuls of a
growing and a shrinking factor (e^{-G} overflows after a few strongly decaying tokens): they are taken elementwise
over (BT, BT, BKP) blocks, BKP key channels at a time, which chunks of BT = 16 tokens keep small. The differences of
cumulative sums lose at most 16 float32 roundings of g, against the torch form's sums of the g's in between.

Kernels (grid in brackets; NC chunks over all sequences, NV value tiles, NK key tiles of BKP):

    forward   1. _chunk_prepare_kernel       (NC, H): pair matrices, T, Q̃ K̃ B̃ P (per token), γ (per chunk), W.
              2. _chunk_states_fwd_kernel    (N*H, NV): walks each sequence's chunks in order with a (Dk, BV) tile of
                 the state: U, the state entering every chunk (hs) and the final state.
              3. _chunk_output_fwd_kernel    (NC, NV, H): O, all chunks at once.
    backward  1, 2 again (recomputed, not kept from the forward), then
              4. _chunk_dstates_bwd_kernel   (N*H, NV): the reverse walk: dU, the gradient of the state leaving
                 every chunk (dhs), and the initial-state gradient.
              5. _chunk_dv_bwd_kernel        (NC, H): dR, dV and the four dA, looping over the value tiles.
              6. _chunk_dqk_bwd_kernel       (NC, NK, H): dq, dk, da, db and dg of one key tile.

The forward keeps nothing but its inputs for the backward: no per-token and no per-chunk states (the backward runs
kernels 1 and 2 again). The key dimension is held whole in the walking kernels (the transition mixes key rows;
value columns are independent, hence the value tiles). Sequences are addressed through ``cu_seqlens``, so packed
batches run in one launch, and a regular (B, T) batch is B packed sequences of length T. Dots run in IEEE float32
for float32/float64 inputs (tf32 for 16-bit inputs); everything accumulates in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.ops.delta_rule.naive import state_dtype
from zoo.ops.retention.triton import _chunk_layout, _precision


@triton.jit
def _chunk_prepare_kernel(
    q,  # (TT, H, K)
    k,  # (TT, H, K)
    v,  # (TT, H, V)
    a,  # (TT, H, K)
    b,  # (TT, H, K)
    g,  # (TT, H, K) log-decays, <= 0
    Aqk,  # (TT, H, BT) float32: the pair matrices, row t of the token's chunk
    Aqb,
    Aak,
    Tinv,  # (TT, H, BT) float32: T = (I - A_ab)^{-1}
    qg,  # (TT, H, K) float32: Q̃ (scale included)
    kg,  # (TT, H, K) float32: K̃
    bg,  # (TT, H, K) float32: B̃
    P,  # (TT, H, K) float32: T Ã
    W,  # (TT, H, V) float32: T A_ak V
    gam,  # (NC, H, K) float32: γ = e^{G_C}
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BKP: tl.constexpr,
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
    pair = m_t[:, None] & m_t[None, :]
    strict = (o_t[:, None] > o_t[None, :]) & pair  # (t, i): i before t
    causal = (o_t[:, None] >= o_t[None, :]) & pair

    # 1. the pair matrices, BKP key channels at a time, elementwise (every exponent <= 0); the decayed rows
    b_Aab = tl.zeros([BT, BT], dtype=tl.float32)
    b_Aak = tl.zeros([BT, BT], dtype=tl.float32)
    b_Aqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_Aqb = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKP)):
        o_k = i_k * BKP + tl.arange(0, BKP)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_b = tl.load(b + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(g + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_G = tl.cumsum(b_g, axis=0)  # (BT, BKP); padding tokens add 0
        b_Gp = b_G - b_g  # G_{t-1}
        b_Gc = tl.sum(b_g, axis=0)  # (BKP,) G at the chunk's last token
        e_prev = tl.exp(tl.where(strict[:, :, None], b_Gp[:, None, :] - b_G[None, :, :], float("-inf")))
        b_Aab += tl.sum(b_a[:, None, :] * b_b[None, :, :] * e_prev, axis=2)
        b_Aak += tl.sum(b_a[:, None, :] * b_k[None, :, :] * e_prev, axis=2)
        e_cur = tl.exp(tl.where(causal[:, :, None], b_G[:, None, :] - b_G[None, :, :], float("-inf")))
        b_Aqk += tl.sum(b_q[:, None, :] * b_k[None, :, :] * e_cur, axis=2)
        b_Aqb += tl.sum(b_q[:, None, :] * b_b[None, :, :] * e_cur, axis=2)
        to_end = tl.exp(tl.where(m_t[:, None], b_Gc[None, :] - b_G, float("-inf")))
        tl.store(qg + p_tk, b_q * tl.exp(b_G), mask=m_tk)
        tl.store(kg + p_tk, b_k * to_end, mask=m_tk)
        tl.store(bg + p_tk, b_b * to_end, mask=m_tk)
        tl.store(gam + (i_c * H + i_h) * K + o_k, tl.exp(b_Gc), mask=m_k)

    # 2. T = (I - A_ab)^{-1} by forward substitution, row t = e_t + sum_{i<t} A_ab[t, i] T[i]
    b_T = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    for t in range(1, BT):
        row = tl.sum(tl.where(o_t[:, None] == t, b_Aab, 0.0), axis=0)  # A_ab[t, :]
        b_T += tl.where(o_t[:, None] == t, tl.sum(row[:, None] * b_T, axis=0)[None, :], 0.0)
    p_tt = (tok[:, None] * H + i_h) * BT + o_t[None, :]
    tl.store(Aqk + p_tt, b_Aqk, mask=m_t[:, None])
    tl.store(Aqb + p_tt, b_Aqb, mask=m_t[:, None])
    tl.store(Aak + p_tt, b_Aak, mask=m_t[:, None])
    tl.store(Tinv + p_tt, b_T, mask=m_t[:, None])

    # 3. P = T Ã and W = T A_ak V
    for i_k in range(0, tl.cdiv(K, BKP)):
        o_k = i_k * BKP + tl.arange(0, BKP)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(g + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_at = b_a * tl.exp(tl.cumsum(b_g, axis=0) - b_g)
        tl.store(P + p_tk, tl.dot(b_T, b_at, input_precision=PRECISION), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_w = tl.dot(b_T, tl.dot(b_Aak, b_v, input_precision=PRECISION), input_precision=PRECISION)
        tl.store(W + p_tv, b_w, mask=m_tv)


@triton.jit
def _chunk_states_fwd_kernel(
    kg,  # (TT, H, K) float32
    bg,  # (TT, H, K) float32
    P,  # (TT, H, K) float32
    W,  # (TT, H, V) float32
    v,  # (TT, H, V)
    gam,  # (NC, H, K) float32
    h0,  # (N, H, K, V) initial states, read if USE_H0
    hs,  # (NC, H, K, V) float32: the state entering every chunk
    U,  # (TT, H, V) float32: u_t = S_{t-1}^T a_t
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
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(0, tl.cdiv(T, BT)):
        tl.store(hs + ((c0 + i_c) * H + i_h) * K * V + p_kv, b_S, mask=m_kv)
        tok = bos + i_c * BT + o_t
        m_t = (i_c * BT + o_t) < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        b_P = tl.load(P + p_tk, mask=m_tk, other=0.0)  # (BT, BK)
        b_kg = tl.load(kg + p_tk, mask=m_tk, other=0.0)
        b_bg = tl.load(bg + p_tk, mask=m_tk, other=0.0)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)  # (BT, BV)
        b_U = tl.load(W + p_tv, mask=m_tv, other=0.0) + tl.dot(b_P, b_S, input_precision=PRECISION)
        tl.store(U + p_tv, b_U, mask=m_tv)
        b_gam = tl.load(gam + ((c0 + i_c) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_S = b_S * b_gam[:, None]
        b_S += tl.dot(tl.trans(b_kg), b_v, input_precision=PRECISION)
        b_S += tl.dot(tl.trans(b_bg), b_U, input_precision=PRECISION)
    tl.store(ht + (i_n * H + i_h) * K * V + p_kv, b_S, mask=m_kv)


@triton.jit
def _chunk_output_fwd_kernel(
    qg,  # (TT, H, K) float32
    v,  # (TT, H, V)
    U,  # (TT, H, V) float32
    Aqk,  # (TT, H, BT) float32
    Aqb,  # (TT, H, BT) float32
    hs,  # (NC, H, K, V) float32
    o,  # (TT, H, V) output
    cu_seqlens,
    chunk_indices,
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
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
    p_tt = (tok[:, None] * H + i_h) * BT + o_t[None, :]

    b_qg = tl.load(
        qg + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0
    )
    b_S = tl.load(
        hs + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
        mask=m_k[:, None] & m_v[None, :],
        other=0.0,
    )
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_U = tl.load(U + p_tv, mask=m_tv, other=0.0)
    b_o = tl.dot(b_qg, b_S, input_precision=PRECISION)
    b_o += tl.dot(tl.load(Aqk + p_tt, mask=m_t[:, None], other=0.0), b_v, input_precision=PRECISION)
    b_o += tl.dot(tl.load(Aqb + p_tt, mask=m_t[:, None], other=0.0), b_U, input_precision=PRECISION)
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _chunk_dstates_bwd_kernel(
    qg,  # (TT, H, K) float32
    bg,  # (TT, H, K) float32
    P,  # (TT, H, K) float32
    Aqb,  # (TT, H, BT) float32
    gam,  # (NC, H, K) float32
    do,  # (TT, H, V)
    dht,  # (N, H, K, V) grad of the final states, read if USE_DHT
    dhs,  # (NC, H, K, V) float32: grad of the state leaving every chunk
    dU,  # (TT, H, V) float32
    dh0,  # (N, H, K, V) float32: grad of the initial states
    cu_seqlens,
    chunk_offsets,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(T, BT)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
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
        m_tv = m_t[:, None] & m_v[None, :]
        p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
        p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        b_qg = tl.load(qg + p_tk, mask=m_tk, other=0.0)  # (BT, BK)
        b_bg = tl.load(bg + p_tk, mask=m_tk, other=0.0)
        b_P = tl.load(P + p_tk, mask=m_tk, other=0.0)
        b_Aqb = tl.load(Aqb + (tok[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)  # (BT, BV)
        b_dU = tl.dot(b_bg, b_dS, input_precision=PRECISION)
        b_dU += tl.dot(tl.trans(b_Aqb), b_do, input_precision=PRECISION)
        tl.store(dU + p_tv, b_dU, mask=m_tv)
        b_gam = tl.load(gam + ((c0 + i_c) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_dS = b_dS * b_gam[:, None]
        b_dS += tl.dot(tl.trans(b_qg), b_do, input_precision=PRECISION)
        b_dS += tl.dot(tl.trans(b_P), b_dU, input_precision=PRECISION)
    tl.store(dh0 + (i_n * H + i_h) * K * V + p_kv, b_dS, mask=m_kv)


@triton.jit
def _chunk_dv_bwd_kernel(
    v,  # (TT, H, V)
    U,  # (TT, H, V) float32
    do,  # (TT, H, V)
    dU,  # (TT, H, V) float32
    kg,  # (TT, H, K) float32
    Aqk,  # (TT, H, BT) float32
    Aak,  # (TT, H, BT) float32
    Tinv,  # (TT, H, BT) float32
    dhs,  # (NC, H, K, V) float32
    dv,  # (TT, H, V) float32
    dR,  # (TT, H, V) float32: T^T dU
    dAqk,  # (TT, H, BT) float32
    dAqb,
    dAak,
    dAab,
    cu_seqlens,
    chunk_indices,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T
    p_tt = (tok[:, None] * H + i_h) * BT + o_t[None, :]
    b_Aqk = tl.load(Aqk + p_tt, mask=m_t[:, None], other=0.0)
    b_Aak = tl.load(Aak + p_tt, mask=m_t[:, None], other=0.0)
    b_T = tl.load(Tinv + p_tt, mask=m_t[:, None], other=0.0)
    b_kg = tl.load(
        kg + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0
    )

    b_dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dAqb = tl.zeros([BT, BT], dtype=tl.float32)
    b_dAak = tl.zeros([BT, BT], dtype=tl.float32)
    b_dAab = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_U = tl.load(U + p_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_dR = tl.dot(tl.trans(b_T), tl.load(dU + p_tv, mask=m_tv, other=0.0), input_precision=PRECISION)
        tl.store(dR + p_tv, b_dR, mask=m_tv)
        b_dS = tl.load(
            dhs + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )  # (BK, BV): the gradient of the state leaving the chunk
        b_dv = tl.dot(tl.trans(b_Aqk), b_do, input_precision=PRECISION)
        b_dv += tl.dot(b_kg, b_dS, input_precision=PRECISION)
        b_dv += tl.dot(tl.trans(b_Aak), b_dR, input_precision=PRECISION)
        tl.store(dv + p_tv, b_dv, mask=m_tv)
        b_dAqk += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_dAqb += tl.dot(b_do, tl.trans(b_U), input_precision=PRECISION)
        b_dAak += tl.dot(b_dR, tl.trans(b_v), input_precision=PRECISION)
        b_dAab += tl.dot(b_dR, tl.trans(b_U), input_precision=PRECISION)
    causal = o_t[:, None] >= o_t[None, :]
    strict = o_t[:, None] > o_t[None, :]
    tl.store(dAqk + p_tt, tl.where(causal, b_dAqk, 0.0), mask=m_t[:, None])
    tl.store(dAqb + p_tt, tl.where(causal, b_dAqb, 0.0), mask=m_t[:, None])
    tl.store(dAak + p_tt, tl.where(strict, b_dAak, 0.0), mask=m_t[:, None])
    tl.store(dAab + p_tt, tl.where(strict, b_dAab, 0.0), mask=m_t[:, None])


@triton.jit
def _chunk_dqk_bwd_kernel(
    q,  # (TT, H, K)
    k,
    a,
    b,
    g,
    v,  # (TT, H, V)
    U,  # (TT, H, V) float32
    do,  # (TT, H, V)
    dR,  # (TT, H, V) float32
    hs,  # (NC, H, K, V) float32: the state entering every chunk
    dhs,  # (NC, H, K, V) float32: grad of the state leaving every chunk
    dAqk,  # (TT, H, BT) float32
    dAqb,
    dAak,
    dAab,
    dq,  # (TT, H, K) float32
    dk,
    da,
    db,
    dg,
    cu_seqlens,
    chunk_indices,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BKP: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_k, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    o_t = tl.arange(0, BT)
    o_k = i_k * BKP + tl.arange(0, BKP)
    m_k = o_k < K
    tok = bos + i_t * BT + o_t
    m_t = (i_t * BT + o_t) < T
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]

    # 1. the gradients of the rows Q̃, K̃, B̃, Ã and of γ, summed over the value tiles
    b_dqg = tl.zeros([BT, BKP], dtype=tl.float32)
    b_dkg = tl.zeros([BT, BKP], dtype=tl.float32)
    b_dbg = tl.zeros([BT, BKP], dtype=tl.float32)
    b_dag = tl.zeros([BT, BKP], dtype=tl.float32)
    b_dgam = tl.zeros([BKP], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        p_kv = (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_S = tl.load(hs + p_kv, mask=m_kv, other=0.0)  # (BKP, BV)
        b_dS = tl.load(dhs + p_kv, mask=m_kv, other=0.0)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_U = tl.load(U + p_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_dR = tl.load(dR + p_tv, mask=m_tv, other=0.0)
        b_dqg += tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION)
        b_dkg += tl.dot(b_v, tl.trans(b_dS), input_precision=PRECISION)
        b_dbg += tl.dot(b_U, tl.trans(b_dS), input_precision=PRECISION)
        b_dag += tl.dot(b_dR, tl.trans(b_S), input_precision=PRECISION)
        b_dgam += tl.sum(b_dS * b_S, axis=1)

    # 2. the pair matrices' gradients, elementwise over (BT, BT, BKP) as the forward built them
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_g = tl.load(g + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_G = tl.cumsum(b_g, axis=0)
    b_Gp = b_G - b_g
    b_Gc = tl.sum(b_g, axis=0)
    pair = m_t[:, None] & m_t[None, :]
    strict = (o_t[:, None] > o_t[None, :]) & pair
    causal = (o_t[:, None] >= o_t[None, :]) & pair
    p_tt = (tok[:, None] * H + i_h) * BT + o_t[None, :]
    b_dAqk = tl.load(dAqk + p_tt, mask=m_t[:, None], other=0.0)
    b_dAqb = tl.load(dAqb + p_tt, mask=m_t[:, None], other=0.0)
    b_dAak = tl.load(dAak + p_tt, mask=m_t[:, None], other=0.0)
    b_dAab = tl.load(dAab + p_tt, mask=m_t[:, None], other=0.0)
    e_prev = tl.exp(tl.where(strict[:, :, None], b_Gp[:, None, :] - b_G[None, :, :], float("-inf")))
    e_cur = tl.exp(tl.where(causal[:, :, None], b_G[:, None, :] - b_G[None, :, :], float("-inf")))
    b_da = tl.sum(
        (b_dAak[:, :, None] * b_k[None, :, :] + b_dAab[:, :, None] * b_b[None, :, :]) * e_prev, axis=1
    )
    b_dq = tl.sum(
        (b_dAqk[:, :, None] * b_k[None, :, :] + b_dAqb[:, :, None] * b_b[None, :, :]) * e_cur, axis=1
    )
    b_dk = tl.sum(
        b_dAak[:, :, None] * b_a[:, None, :] * e_prev + b_dAqk[:, :, None] * b_q[:, None, :] * e_cur, axis=0
    )
    b_db = tl.sum(
        b_dAab[:, :, None] * b_a[:, None, :] * e_prev + b_dAqb[:, :, None] * b_q[:, None, :] * e_cur, axis=0
    )

    # 3. dL/dG through G_t (rows at G_t, columns at G_i), through G_{t-1} and through G_C
    b_via_G = b_q * b_dq - b_k * b_dk - b_b * b_db
    b_via_Gp = b_a * b_da
    e_G = tl.exp(b_G)
    e_Gp = tl.exp(b_Gp)
    to_end = tl.exp(tl.where(m_t[:, None], b_Gc[None, :] - b_G, float("-inf")))
    b_dq += b_dqg * e_G
    b_via_G += b_dqg * b_q * e_G
    b_da += b_dag * e_Gp
    b_via_Gp += b_dag * b_a * e_Gp
    b_end = b_dkg * b_k * to_end + b_dbg * b_b * to_end
    b_dk += b_dkg * to_end
    b_db += b_dbg * to_end
    b_via_G -= b_end
    b_via_Gc = tl.sum(b_end, axis=0) + b_dgam * tl.exp(b_Gc)
    # g_s enters G_t for every t >= s of its chunk, G_{s-1} = G_s - g_s, and G_C
    b_dg = tl.cumsum(b_via_G + b_via_Gp, axis=0, reverse=True) - b_via_Gp + b_via_Gc[None, :]
    tl.store(dq + p_tk, b_dq * scale, mask=m_tk)
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    tl.store(da + p_tk, b_da, mask=m_tk)
    tl.store(db + p_tk, b_db, mask=m_tk)
    tl.store(dg + p_tk, b_dg, mask=m_tk)


class LaunchConfig(NamedTuple):
    """Block sizes and launch options shared by the kernels of one call."""

    BT: int  # tokens per chunk
    BK: int  # the key dimension, whole (a power of 2 >= 16)
    BKP: int  # key channels per elementwise pair block, and per program of the dq/dk kernel
    BV: int  # value channels per program or loop step
    num_warps: int  # of the kernels built on dots
    pair_warps: int  # of the two kernels holding (BT, BT, BKP) blocks


CHUNK = 16


def launch_config(K: int, V: int) -> LaunchConfig:
    """Chunks of 16 tokens, pair blocks of 16 x 16 x 16 (8 warps), the whole key dimension in the walking kernels
    and value tiles of up to 32 channels (4 warps). Compiled at RWKV-7's head size 64 for sm_80 and sm_90
    (tests/ops/test_triton_gpu_compile.py): at most 47 KB of shared memory per block, no spills; the two walking
    kernels use 255 registers per thread with float32 inputs (IEEE dots), 128 to 180 with 16-bit ones."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(32, max(16, triton.next_power_of_2(V)))
    return LaunchConfig(BT=CHUNK, BK=BK, BKP=16, BV=BV, num_warps=4, pair_warps=8)


def _prepare_and_states(q, k, v, a, b, g, h0, cu_seqlens, chunk_offsets, chunk_indices, scale, cfg):
    """Kernels 1 and 2: the per-chunk quantities, U, the state entering every chunk and the final states."""
    _, TT, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    n_chunks = chunk_indices.shape[0]
    f32 = {"dtype": torch.float32, "device": q.device}
    x = {
        name: torch.zeros(TT, H, size, **f32)
        for name, size in (("Aqk", cfg.BT), ("Aqb", cfg.BT), ("Aak", cfg.BT), ("Tinv", cfg.BT),
                           ("qg", K), ("kg", K), ("bg", K), ("P", K), ("W", V), ("U", V))
    }  # fmt: skip
    x["gam"] = torch.zeros(n_chunks, H, K, **f32)
    x["hs"] = torch.empty(n_chunks, H, K, V, **f32)
    precision = _precision(q.dtype)
    if n_chunks > 0:
        _chunk_prepare_kernel[(n_chunks, H)](
            q, k, v, a, b, g, x["Aqk"], x["Aqb"], x["Aak"], x["Tinv"], x["qg"], x["kg"], x["bg"], x["P"], x["W"],
            x["gam"], cu_seqlens, chunk_indices, scale,
            H=H, K=K, V=V, BT=cfg.BT, BKP=cfg.BKP, BV=cfg.BV, PRECISION=precision, num_warps=cfg.pair_warps,
        )  # fmt: skip
    ht = torch.empty(N, H, K, V, **f32)
    _chunk_states_fwd_kernel[(N * H, triton.cdiv(V, cfg.BV))](
        x["kg"], x["bg"], x["P"], x["W"], v, x["gam"], ht if h0 is None else h0, x["hs"], x["U"], ht,
        cu_seqlens, chunk_offsets,
        H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, USE_H0=h0 is not None, PRECISION=precision,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return x, ht


class _ChunkDPLR(torch.autograd.Function):
    """Packed sequences: q, k, a, b, g (1, TT, H, K); v (1, TT, H, V); states (N, H, K, V); cu_seqlens (N + 1,)."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, g, initial_state, cu_seqlens, scale):
        _, TT, H, K = q.shape
        V = v.shape[-1]
        cfg = launch_config(K, V)
        chunk_offsets, chunk_indices = _chunk_layout(cu_seqlens, cfg.BT)
        q, k, v, a, b, g = (t.contiguous() for t in (q, k, v, a, b, g))
        h0 = None if initial_state is None else initial_state.contiguous()
        x, ht = _prepare_and_states(
            q, k, v, a, b, g, h0, cu_seqlens, chunk_offsets, chunk_indices, scale, cfg
        )
        o = torch.empty_like(v)
        n_chunks = chunk_indices.shape[0]
        if n_chunks > 0:
            _chunk_output_fwd_kernel[(n_chunks, triton.cdiv(V, cfg.BV), H)](
                x["qg"], v, x["U"], x["Aqk"], x["Aqb"], x["hs"], o, cu_seqlens, chunk_indices,
                H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, PRECISION=_precision(q.dtype),
                num_warps=cfg.num_warps,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, a, b, g, h0, cu_seqlens, chunk_offsets, chunk_indices)
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
        q, k, v, a, b, g, h0, cu_seqlens, chunk_offsets, chunk_indices = ctx.saved_tensors
        _, TT, H, K = q.shape
        V = v.shape[-1]
        N = cu_seqlens.numel() - 1
        cfg, scale, precision = ctx.cfg, ctx.scale, _precision(q.dtype)
        n_chunks = chunk_indices.shape[0]
        NV = triton.cdiv(V, cfg.BV)
        # 1, 2 again: the forward kept none of its intermediates
        x, _ = _prepare_and_states(q, k, v, a, b, g, h0, cu_seqlens, chunk_offsets, chunk_indices, scale, cfg)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.contiguous()
        f32 = {"dtype": torch.float32, "device": q.device}

        # 4. the reverse walk over each sequence's chunks
        dhs = torch.empty(n_chunks, H, K, V, **f32)
        dU = torch.zeros(1, TT, H, V, **f32)
        dh0 = torch.empty(N, H, K, V, **f32)
        _chunk_dstates_bwd_kernel[(N * H, NV)](
            x["qg"], x["bg"], x["P"], x["Aqb"], x["gam"], do, dh0 if dht is None else dht, dhs, dU, dh0,
            cu_seqlens, chunk_offsets,
            H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, USE_DHT=dht is not None, PRECISION=precision,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        # 5, 6. every chunk at once
        dq, dk, da, db, dg = (torch.zeros(q.shape, **f32) for _ in range(5))
        dv, dR = torch.zeros(v.shape, **f32), torch.zeros(v.shape, **f32)
        dA = [torch.zeros(TT, H, cfg.BT, **f32) for _ in range(4)]
        if n_chunks > 0:
            _chunk_dv_bwd_kernel[(n_chunks, H)](
                v, x["U"], do, dU, x["kg"], x["Aqk"], x["Aak"], x["Tinv"], dhs, dv, dR, *dA,
                cu_seqlens, chunk_indices,
                H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, PRECISION=precision, num_warps=cfg.num_warps,
            )  # fmt: skip
            _chunk_dqk_bwd_kernel[(n_chunks, triton.cdiv(K, cfg.BKP), H)](
                q, k, a, b, g, v, x["U"], do, dR, x["hs"], dhs, *dA, dq, dk, da, db, dg,
                cu_seqlens, chunk_indices, scale,
                H=H, K=K, V=V, BT=cfg.BT, BKP=cfg.BKP, BV=cfg.BV, PRECISION=precision, num_warps=cfg.pair_warps,
            )  # fmt: skip
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        grads = (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            da.to(a.dtype),
            db.to(b.dtype),
            dg.to(g.dtype),
        )
        return (*grads, dh0, None, None)


def triton_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generalised delta rule on Triton kernels. q, k, a, b, g (B, T, H, K); v (B, T, H, V); states
    (B, H, K, V), or one per packed sequence (``cu_seqlens``, B == 1). Chunks are always 16 tokens."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        # a regular batch is B packed sequences of length T
        cu = torch.arange(0, B + 1, device=q.device, dtype=torch.int64) * T
        packed = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, a, b, g))
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        packed = (q, k, v, a, b, g)
    o, ht = _ChunkDPLR.apply(*packed, initial_state, cu.contiguous(), float(scale))
    return o.reshape(B, T, H, V), (ht if output_final_state else None)
