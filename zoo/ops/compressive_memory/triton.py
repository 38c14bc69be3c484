r"""Infini-attention's compressive memory as Triton kernels, forward and backward, in ``torch.autograd.Function``.

Munkhdalai et al. 2024, "Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention",
arXiv:2404.07143, section 2.1.2 (the equations are in ``naive.py``). Per segment s of a sequence, with σ = ELU + 1,
the memory (M, z) entering it, e_t = σk_t . z + eps and d_t = σq_t . z + eps:

    read      o_t = σq_t M / d_t                                         (every token of the segment, same M, z)
    write     M' = M + σK^T U,   z' = z + sum_t σk_t,
              U = V (linear),   u_t = v_t - r_t with r_t = σk_t M / e_t (delta)

Nothing inside a segment depends on another token of it: a segment is a sum over its tokens, read and written
against the same (M, z). So the only sequential work is the walk from segment to segment; everything per token
runs over all tokens at once. With dM, dz the gradient of the memory leaving segment s:

    read      dσq_t = (do_t / d_t) M^T - (do_t . o_t / d_t) z
              dM += σQ^T (dO / d),   dz -= sum_t (do_t . o_t / d_t) σq_t
    write     dv_t = du_t = σk_t dM
              linear  dσk_t = dM v_t^T + dz
              delta   dσk_t = dM u_t^T - (du_t / e_t) M^T + (du_t . r_t / e_t) z + dz
                      dM -= σK^T (dU / e),   dz += sum_t (du_t . r_t / e_t) σk_t
              and the memory entering gets the memory leaving's gradient, dM += dM', dz += dz'

and dq, dk follow through σ'(x) = 1 (x > 0), e^x (x <= 0).

Kernels (grid in brackets; S segments over all sequences, NC blocks of BT tokens, each inside one segment, NV value
tiles of BV):

    forward   1. _segment_states_fwd_kernel   (N*H, NV): walks each sequence's segments in order with a (Dk, BV)
                 tile of M (and all of z), looping over the segment's tokens BT at a time to sum its write; stores
                 the memory entering every segment (Ms, zs) and the final memory.
              2. _segment_read_fwd_kernel     (NC, NV, H): the reads, every block at once.
    backward  3. _segment_states_bwd_kernel   (N*H, NV): the reverse walk: dM leaving every segment (dMs), each value
                 tile's share of dz leaving it (the terms do_t . o_t and du_t . r_t are sums over the value
                 channels; the shares are added after the kernel), and the initial state's gradient.
              4. _segment_grads_bwd_kernel    (NC, H): dq, dk, dv of a block, looping over the value tiles.

The key dimension is held whole (σk M and σq M contract over it; the value columns are independent, hence the
tiles). The forward keeps the memory entering every segment for the backward, Dk (Dv + 1) / L floats per token
(as the ``torch`` form does). Sequences are addressed through ``cu_seqlens``, so packed batches run in one launch,
and a regular (B, T) batch is B packed sequences of length T. Dots run in IEEE float32 for float32/float64 inputs
(tf32 for 16-bit inputs); everything accumulates in float32. Padding rows of a block are zeroed after the feature
map (σ(0) = 1 would otherwise write them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.ops.compressive_memory.naive import state_dtype
from zoo.ops.retention.triton import _precision


@triton.jit
def _segment_states_fwd_kernel(
    k,  # (TT, H, K) packed tokens
    v,  # (TT, H, V)
    h0M,  # (N, H, K, V) initial memories, read if USE_H0
    h0z,  # (N, H, K) initial normalisers
    Ms,  # (S, H, K, V) float32: M entering every segment
    zs,  # (S, H, K) float32: z entering every segment
    hM,  # (N, H, K, V) float32: the final memories
    hz,  # (N, H, K) float32
    cu_seqlens,
    seg_offsets,  # (N + 1,) index of each sequence's first segment
    eps,
    L,  # segment length
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    DELTA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    s0 = tl.load(seg_offsets + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    # z is computed whole by every value tile (it is cheap); the first tile stores it
    m_z = o_k < tl.where(i_v == 0, K, 0)

    b_M = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if USE_H0:
        b_M += tl.load(h0M + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_z += tl.load(h0z + (i_n * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    for i_s in range(0, tl.cdiv(T, L)):
        seg = (s0 + i_s) * H + i_h
        tl.store(Ms + seg * K * V + p_kv, b_M, mask=m_kv)
        tl.store(zs + seg * K + o_k, b_z, mask=m_z)
        start = i_s * L
        end = tl.minimum(start + L, T)
        # the segment's write, against the memory entering it
        b_dM = tl.zeros([BK, BV], dtype=tl.float32)
        b_dz = tl.zeros([BK], dtype=tl.float32)
        for i_b in range(0, tl.cdiv(end - start, BT)):
            pos = start + i_b * BT + o_t
            m_t = pos < end
            m_tk = m_t[:, None] & m_k[None, :]
            m_tv = m_t[:, None] & m_v[None, :]
            tok = bos + pos
            p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
            p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
            b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
            b_sk = tl.where(m_tk, tl.where(b_k > 0, b_k + 1.0, tl.exp(tl.minimum(b_k, 0.0))), 0.0)  # (BT, BK)
            b_u = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
            if DELTA:
                b_e = tl.sum(b_sk * b_z[None, :], axis=1) + eps  # (BT,)
                b_u -= tl.dot(b_sk, b_M, input_precision=PRECISION) / b_e[:, None]
            b_dM += tl.dot(tl.trans(b_sk), b_u, input_precision=PRECISION)
            b_dz += tl.sum(b_sk, axis=0)
        b_M += b_dM
        b_z += b_dz
    tl.store(hM + (i_n * H + i_h) * K * V + p_kv, b_M, mask=m_kv)
    tl.store(hz + (i_n * H + i_h) * K + o_k, b_z, mask=m_z)


@triton.jit
def _segment_read_fwd_kernel(
    q,  # (TT, H, K)
    Ms,  # (S, H, K, V) float32
    zs,  # (S, H, K) float32
    o,  # (TT, H, V) output
    blocks,  # (NC, 3) int64: first token, tokens, segment
    eps,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_v, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    first = tl.load(blocks + 3 * i_c)
    count = tl.load(blocks + 3 * i_c + 1)
    seg = tl.load(blocks + 3 * i_c + 2) * H + i_h
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < count
    m_k = o_k < K
    m_v = o_v < V
    m_tk = m_t[:, None] & m_k[None, :]
    tok = first + o_t

    b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_sq = tl.where(m_tk, tl.where(b_q > 0, b_q + 1.0, tl.exp(tl.minimum(b_q, 0.0))), 0.0)
    m_kv = m_k[:, None] & m_v[None, :]
    b_M = tl.load(Ms + seg * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
    b_z = tl.load(zs + seg * K + o_k, mask=m_k, other=0.0)
    b_d = tl.sum(b_sq * b_z[None, :], axis=1) + eps
    b_o = tl.dot(b_sq, b_M, input_precision=PRECISION) / b_d[:, None]
    p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _segment_states_bwd_kernel(
    q,  # (TT, H, K)
    k,  # (TT, H, K)
    do,  # (TT, H, V)
    Ms,  # (S, H, K, V) float32
    zs,  # (S, H, K) float32
    dhtM,  # (N, H, K, V) grad of the final memories, read if USE_DHT
    dhtz,  # (N, H, K)
    dMs,  # (S, H, K, V) float32: grad of M leaving every segment
    dzs,  # (S, H, NV, K) float32: each value tile's share of the grad of z leaving every segment
    dh0M,  # (N, H, K, V) float32: grad of the initial memories
    dh0z,  # (N, H, NV, K) float32: each value tile's share of the grad of the initial normalisers
    cu_seqlens,
    seg_offsets,
    eps,
    L,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NV: tl.constexpr,
    USE_DHT: tl.constexpr,
    DELTA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    s0 = tl.load(seg_offsets + i_n).to(tl.int64)
    NS = tl.cdiv(T, L)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]

    b_dM = tl.zeros([BK, BV], dtype=tl.float32)
    b_dz = tl.zeros([BK], dtype=tl.float32)
    if USE_DHT:
        b_dM += tl.load(dhtM + (i_n * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        # the final normaliser's gradient is counted once, in the first tile's share
        m_z = o_k < tl.where(i_v == 0, K, 0)
        b_dz += tl.load(dhtz + (i_n * H + i_h) * K + o_k, mask=m_z, other=0.0).to(tl.float32)
    for i_r in range(0, NS):
        i_s = NS - 1 - i_r
        seg = (s0 + i_s) * H + i_h
        tl.store(dMs + seg * K * V + p_kv, b_dM, mask=m_kv)
        tl.store(dzs + (seg * NV + i_v) * K + o_k, b_dz, mask=m_k)
        b_M = tl.load(Ms + seg * K * V + p_kv, mask=m_kv, other=0.0)
        b_z = tl.load(zs + seg * K + o_k, mask=m_k, other=0.0)
        start = i_s * L
        end = tl.minimum(start + L, T)
        # the memory entering the segment: read by its tokens, and (delta) retrieved from by its write
        b_aM = tl.zeros([BK, BV], dtype=tl.float32)
        b_az = tl.zeros([BK], dtype=tl.float32)
        for i_b in range(0, tl.cdiv(end - start, BT)):
            pos = start + i_b * BT + o_t
            m_t = pos < end
            m_tk = m_t[:, None] & m_k[None, :]
            m_tv = m_t[:, None] & m_v[None, :]
            tok = bos + pos
            p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
            b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
            b_sq = tl.where(m_tk, tl.where(b_q > 0, b_q + 1.0, tl.exp(tl.minimum(b_q, 0.0))), 0.0)
            p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
            b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
            b_d = tl.sum(b_sq * b_z[None, :], axis=1) + eps
            b_dn = b_do / b_d[:, None]  # (BT, BV)
            b_aM += tl.dot(tl.trans(b_sq), b_dn, input_precision=PRECISION)
            # this tile's share of -do . o / d
            b_dd = -tl.sum(b_dn * tl.dot(b_sq, b_M, input_precision=PRECISION), axis=1) / b_d
            b_az += tl.sum(b_dd[:, None] * b_sq, axis=0)
            if DELTA:
                b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
                b_sk = tl.where(m_tk, tl.where(b_k > 0, b_k + 1.0, tl.exp(tl.minimum(b_k, 0.0))), 0.0)
                b_e = tl.sum(b_sk * b_z[None, :], axis=1) + eps
                b_du = tl.dot(b_sk, b_dM, input_precision=PRECISION) / b_e[:, None]  # du / e
                b_aM -= tl.dot(tl.trans(b_sk), b_du, input_precision=PRECISION)
                # this tile's share of du . r / e, r = σk M / e
                b_de = tl.sum(b_du * tl.dot(b_sk, b_M, input_precision=PRECISION), axis=1) / b_e
                b_az += tl.sum(b_de[:, None] * b_sk, axis=0)
        b_dM += b_aM
        b_dz += b_az
    tl.store(dh0M + (i_n * H + i_h) * K * V + p_kv, b_dM, mask=m_kv)
    tl.store(dh0z + ((i_n * H + i_h) * NV + i_v) * K + o_k, b_dz, mask=m_k)


@triton.jit
def _segment_grads_bwd_kernel(
    q,  # (TT, H, K)
    k,  # (TT, H, K)
    v,  # (TT, H, V)
    do,  # (TT, H, V)
    Ms,  # (S, H, K, V) float32: M entering every segment
    zs,  # (S, H, K) float32
    dMs,  # (S, H, K, V) float32: grad of M leaving every segment
    dzs,  # (S, H, K) float32: grad of z leaving every segment
    dq,  # (TT, H, K) float32
    dk,  # (TT, H, K) float32
    dv,  # (TT, H, V) float32
    blocks,  # (NC, 3) int64: first token, tokens, segment
    eps,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DELTA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    first = tl.load(blocks + 3 * i_c)
    count = tl.load(blocks + 3 * i_c + 1)
    seg = tl.load(blocks + 3 * i_c + 2) * H + i_h
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t = o_t < count
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    tok = first + o_t
    p_tk = (tok[:, None] * H + i_h) * K + o_k[None, :]

    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_sq = tl.where(m_tk, tl.where(b_q > 0, b_q + 1.0, tl.exp(tl.minimum(b_q, 0.0))), 0.0)
    b_sk = tl.where(m_tk, tl.where(b_k > 0, b_k + 1.0, tl.exp(tl.minimum(b_k, 0.0))), 0.0)
    b_z = tl.load(zs + seg * K + o_k, mask=m_k, other=0.0)
    b_dz = tl.load(dzs + seg * K + o_k, mask=m_k, other=0.0)
    b_d = tl.sum(b_sq * b_z[None, :], axis=1) + eps
    b_e = tl.sum(b_sk * b_z[None, :], axis=1) + eps

    b_dsq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dsk = tl.zeros([BT, BK], dtype=tl.float32)
    b_don = tl.zeros([BT], dtype=tl.float32)  # do . o d, summed over the value tiles
    b_dur = tl.zeros([BT], dtype=tl.float32)  # du . r e
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        p_kv = seg * K * V + o_k[:, None] * V + o_v[None, :]
        b_M = tl.load(Ms + p_kv, mask=m_kv, other=0.0)  # (BK, BV)
        b_dM = tl.load(dMs + p_kv, mask=m_kv, other=0.0)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        # 1. the read
        b_dsq += tl.dot(b_do, tl.trans(b_M), input_precision=PRECISION)
        b_don += tl.sum(b_do * tl.dot(b_sq, b_M, input_precision=PRECISION), axis=1)
        # 2. the write: du = σk dM' is dv under both rules
        b_du = tl.dot(b_sk, b_dM, input_precision=PRECISION)
        tl.store(dv + p_tv, b_du, mask=m_tv)
        if DELTA:
            b_r = tl.dot(b_sk, b_M, input_precision=PRECISION)  # r e
            b_dsk += tl.dot(b_v - b_r / b_e[:, None], tl.trans(b_dM), input_precision=PRECISION)
            b_dsk -= tl.dot(b_du, tl.trans(b_M), input_precision=PRECISION) / b_e[:, None]
            b_dur += tl.sum(b_du * b_r, axis=1)
        else:
            b_dsk += tl.dot(b_v, tl.trans(b_dM), input_precision=PRECISION)
    b_dsq = (b_dsq - (b_don / b_d)[:, None] * b_z[None, :]) / b_d[:, None]
    b_dsk += b_dz[None, :]
    if DELTA:
        b_dsk += (b_dur / (b_e * b_e))[:, None] * b_z[None, :]
    # σ'(x) = 1 where x > 0 (σ > 1), σ(x) = e^x elsewhere (σ <= 1): min(σ, 1)
    tl.store(dq + p_tk, b_dsq * tl.minimum(b_sq, 1.0), mask=m_tk)
    tl.store(dk + p_tk, b_dsk * tl.minimum(b_sk, 1.0), mask=m_tk)


class LaunchConfig(NamedTuple):
    """Block sizes and launch options shared by the kernels of one call."""

    BT: int  # tokens per block (a block never crosses a segment boundary)
    BK: int  # the key dimension, whole (a power of 2 >= 16)
    BV: int  # value channels per program of the walks and the read
    BV_grads: int  # value channels per loop step of the per-block backward, which holds the most blocks
    num_warps: int  # of the forward kernels
    bwd_warps: int  # of the backward kernels, which hold twice the blocks
    bwd_walk_stages: int  # of the backward walk: no software pipelining, which would spill with float32 dots


def launch_config(K: int, V: int) -> LaunchConfig:
    """Blocks of 16 tokens, the whole key dimension, value tiles of up to 32 channels (16 in the per-block
    backward); 4 warps forward, 8 backward. Compiled at Infini-attention's head size 64 for sm_80 and sm_90
    (tests/ops/test_triton_gpu_compile.py): no spills, at most 30 KB of shared memory per block, up to 186
    registers per thread. At head size 128 the backward walk spills with 16-bit inputs (not yet tuned)."""
    BK = max(16, triton.next_power_of_2(K))
    # a (BK, BV) tile of the memory of at most 2048 floats: 32 value channels up to Dk 64, 16 beyond
    BV = min(max(16, 2048 // BK), max(16, triton.next_power_of_2(V)))
    return LaunchConfig(BT=16, BK=BK, BV=BV, BV_grads=16, num_warps=4, bwd_warps=8, bwd_walk_stages=1)


def segment_blocks(
    cu_seqlens: torch.Tensor, segment_length: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``seg_offsets`` (N + 1,), the index of each sequence's first segment in the flat list of all segments, and
    ``blocks`` (NC, 3) int64: the first token, the number of tokens (1 to ``block``) and the segment of every block
    of tokens, segments cut into blocks from their start."""
    device = cu_seqlens.device
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_seg = (lengths + segment_length - 1) // segment_length
    seg_offsets = torch.cat([n_seg.new_zeros(1), n_seg.cumsum(0)])
    seg_seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), n_seg)  # (S,)
    seg_pos = torch.arange(len(seg_seq), device=device) - seg_offsets[seg_seq]  # within its sequence
    seg_start = cu_seqlens[seg_seq] + seg_pos * segment_length
    seg_len = (cu_seqlens[seg_seq + 1] - seg_start).clamp(max=segment_length)
    n_blk = (seg_len + block - 1) // block
    blk_seg = torch.repeat_interleave(torch.arange(len(seg_seq), device=device), n_blk)  # (NC,)
    first_blk = torch.cumsum(n_blk, 0) - n_blk
    within = torch.arange(len(blk_seg), device=device) - first_blk[blk_seg]
    first = seg_start[blk_seg] + within * block
    count = (seg_start[blk_seg] + seg_len[blk_seg] - first).clamp(max=block)
    return seg_offsets, torch.stack([first, count, blk_seg], dim=1).contiguous()


def _split_state(state: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(N, H, K, V + 1) -> M (N, H, K, V) and z (N, H, K), contiguous."""
    if state is None:
        return None, None
    return state[..., :-1].contiguous(), state[..., -1].contiguous()


class _CompressiveMemory(torch.autograd.Function):
    """Packed sequences: q, k (1, TT, H, K); v (1, TT, H, V); states (N, H, K, V + 1); cu_seqlens (N + 1,)."""

    @staticmethod
    def forward(ctx, q, k, v, initial_state, cu_seqlens, segment_length, delta, eps):
        _, TT, H, K = q.shape
        V = v.shape[-1]
        N = cu_seqlens.numel() - 1
        cfg = launch_config(K, V)
        NV = triton.cdiv(V, cfg.BV)
        precision = _precision(q.dtype)
        q, k, v = (t.contiguous() for t in (q, k, v))
        h0M, h0z = _split_state(initial_state)
        seg_offsets, blocks = segment_blocks(cu_seqlens, segment_length, cfg.BT)
        S = int(seg_offsets[-1])
        f32 = {"dtype": torch.float32, "device": q.device}
        Ms, zs = torch.empty(S, H, K, V, **f32), torch.empty(S, H, K, **f32)
        hM, hz = torch.empty(N, H, K, V, **f32), torch.empty(N, H, K, **f32)
        _segment_states_fwd_kernel[(N * H, NV)](
            k, v, hM if h0M is None else h0M, hz if h0z is None else h0z, Ms, zs, hM, hz, cu_seqlens, seg_offsets,
            eps, segment_length,
            H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, USE_H0=h0M is not None, DELTA=delta,
            PRECISION=precision, num_warps=cfg.num_warps,
        )  # fmt: skip
        o = torch.empty_like(v)
        if blocks.shape[0] > 0:
            _segment_read_fwd_kernel[(blocks.shape[0], NV, H)](
                q, Ms, zs, o, blocks, eps,
                H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, PRECISION=precision, num_warps=cfg.num_warps,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, Ms, zs, cu_seqlens, seg_offsets, blocks)
        ctx.cfg, ctx.segment_length, ctx.delta, ctx.eps = cfg, segment_length, delta, eps
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        final = torch.cat([hM, hz[..., None]], dim=-1).to(state_dtype(q.dtype))
        if initial_state is not None:  # an empty sequence passes its initial state on exactly, not rounded
            empty = (cu_seqlens[1:] == cu_seqlens[:-1])[:, None, None, None]
            final = torch.where(empty, initial_state.to(final.dtype), final)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, Ms, zs, cu_seqlens, seg_offsets, blocks = ctx.saved_tensors
        _, TT, H, K = q.shape
        V = v.shape[-1]
        N = cu_seqlens.numel() - 1
        S = Ms.shape[0]
        cfg, precision = ctx.cfg, _precision(q.dtype)
        NV = triton.cdiv(V, cfg.BV)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dhtM, dhtz = _split_state(dht)
        f32 = {"dtype": torch.float32, "device": q.device}

        # 3. the reverse walk over each sequence's segments
        dMs, dzs = torch.empty(S, H, K, V, **f32), torch.zeros(S, H, NV, K, **f32)
        dh0M, dh0z = torch.empty(N, H, K, V, **f32), torch.zeros(N, H, NV, K, **f32)
        _segment_states_bwd_kernel[(N * H, NV)](
            q, k, do, Ms, zs, dh0M if dhtM is None else dhtM, dh0z if dhtz is None else dhtz, dMs, dzs, dh0M, dh0z,
            cu_seqlens, seg_offsets, ctx.eps, ctx.segment_length,
            H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, NV=NV, USE_DHT=dhtM is not None, DELTA=ctx.delta,
            PRECISION=precision, num_warps=cfg.bwd_warps, num_stages=cfg.bwd_walk_stages,
        )  # fmt: skip
        dzs = dzs.sum(2)  # the value tiles' shares

        # 4. every block at once
        dq, dk = torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32)
        dv = torch.zeros(v.shape, **f32)
        if blocks.shape[0] > 0:
            _segment_grads_bwd_kernel[(blocks.shape[0], H)](
                q, k, v, do, Ms, zs, dMs, dzs, dq, dk, dv, blocks, ctx.eps,
                H=H, K=K, V=V, BT=cfg.BT, BK=cfg.BK, BV=cfg.BV_grads, DELTA=ctx.delta, PRECISION=precision,
                num_warps=cfg.bwd_warps,
            )  # fmt: skip
        dh0 = None
        if ctx.h0_dtype is not None:
            dh0 = torch.cat([dh0M, dh0z.sum(2)[..., None]], dim=-1).to(ctx.h0_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0, None, None, None, None


def triton_compressive_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_length: int,
    update: str,
    eps: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The compressive memory on Triton kernels (arguments as ``naive_compressive_memory``). q, k (B, T, H, K);
    v (B, T, H, V); states (B, H, K, V + 1), or one per packed sequence (``cu_seqlens``, B == 1)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        # a regular batch is B packed sequences of length T
        cu = torch.arange(0, B + 1, device=q.device, dtype=torch.int64) * T
        packed = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v))
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        packed = (q, k, v)
    o, final = _CompressiveMemory.apply(
        *packed, initial_state, cu.contiguous(), int(segment_length), update == "delta", float(eps)
    )
    return o.reshape(B, T, H, V), (final if output_final_state else None)
