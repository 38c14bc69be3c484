"""Attention over sorted chunks as Triton kernels, forward and backward, wrapped in ``torch.autograd.Function``.

Same math as ``naive.py`` and ``chunk.py`` (Reformer, Kitaev et al. 2020, "Reformer: The Efficient Transformer",
arXiv:2001.04451, section 2). Hashing, sorting and the gathers into slot order stay in PyTorch (``chunk.py``'s
helpers); the kernels see the ``S = n * T`` slots of the concatenated rounds, cut into ``NC`` chunks of ``C``:

    _chunk_attn_fwd_kernel   a program owns one chunk of queries and walks the window of key chunks
                             ``c - before .. c + after`` (modulo NC: the windows wrap around) with an online softmax;
                             it writes the output, and the row max ``m`` and row sum ``l`` (lse = m + log l)
    _chunk_attn_dq_kernel    the same walk for dq = sum_j ds_ij k_j
    _chunk_attn_dkv_kernel   a program owns one chunk of keys and walks the query chunks whose windows hold it
                             (``c - after .. c + before``), for dk = sum_i ds_ij q_i and dv = sum_i p_ij do_i

with p_ij = exp(s_ij - m_i) / l_i and ds_ij = p_ij (do_i . v_j - do_i . out_i + dlse_i) where s_ij is still q . k
(masked scores are constants: no gradient). The lse of each round is an output (the rounds are combined by its
softmax in PyTorch), so its gradient enters ds. The output is normalised by l itself, not by exp(-lse): a query
whose only key is its own position (scored -1e5) would otherwise see float32 round lse by up to 1/128.

Masks come from the slots' positions (``_triton_scores.py``): padding keys, other segments and (causal) later
keys score -1e9, then the query's own position -1e5 (LSH only; float16: -1e4 and -1e3, ``naive.mask_values``). Dots
run in IEEE float32 for float32 / float64 inputs (tf32 for 16-bit ones), accumulating in float32 (float64 for
float64 inputs). Blocks hold a whole chunk (at least 16 slots) and a whole head; 8 warps from 64 x 64 blocks on.
Dropout on the attention weights has no kernel: it runs the ``torch`` form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.ops.lsh_attention import chunk
from zoo.ops.lsh_attention._triton_scores import _load_rows, _load_slots, _masked_scores
from zoo.ops.lsh_attention.naive import mask_values


@triton.jit
def _chunk_attn_fwd_kernel(
    q,  # (BH, S, D) queries in slot order
    k,  # (BH, S, D) keys, already scaled
    v,  # (BH, S, DV)
    pos,  # (BH, S) int32 position of each slot
    ok,  # (B, T) int32: the key may be attended
    seg,  # (B, T) int32 segment ids (read only with HAS_SEG)
    out,  # (BH, S, DV) accumulator dtype
    m_out,  # (BH, S) accumulator dtype
    l_out,  # (BH, S) accumulator dtype
    H,
    T,
    S,
    NC,
    C,
    BEFORE,
    WINDOW,
    D,
    DV,
    CAUSAL: tl.constexpr,
    SELF: tl.constexpr,
    HAS_SEG: tl.constexpr,
    MASKED: tl.constexpr,
    OWN: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    ACC = out.dtype.element_ty
    i = tl.arange(0, BC)
    i_ok = i < C
    rows = c * C + i
    q_blk = _load_rows(q + bh * S * D, rows, i_ok, D, BD)
    pos_q, q_is_key, seg_q = _load_slots(pos + bh * S, ok + b * T, seg + b * T, rows, i_ok, HAS_SEG)
    m = tl.full((BC,), float("-inf"), dtype=ACC)
    l = tl.zeros((BC,), dtype=ACC)
    acc = tl.zeros((BC, BDV), dtype=ACC)
    for w in range(WINDOW):
        # the key chunk w - before away, wrapping around the concatenated rounds
        cols = (c + w - BEFORE + BEFORE * NC) % NC * C + i
        k_blk = _load_rows(k + bh * S * D, cols, i_ok, D, BD)
        v_blk = _load_rows(v + bh * S * DV, cols, i_ok, DV, BDV)
        pos_k, key_ok, seg_k = _load_slots(pos + bh * S, ok + b * T, seg + b * T, cols, i_ok, HAS_SEG)
        s = tl.dot(q_blk, tl.trans(k_blk), input_precision=PRECISION).to(ACC)
        s, has_grad = _masked_scores(
            s, pos_q, pos_k, seg_q, seg_k, key_ok, i_ok, CAUSAL, SELF, HAS_SEG, MASKED, OWN
        )
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_blk.dtype), v_blk, input_precision=PRECISION).to(ACC)
        m = m_new
    dv = tl.arange(0, BDV)
    o_mask = i_ok[:, None] & (dv[None, :] < DV)
    tl.store(out + bh * S * DV + rows[:, None] * DV + dv[None, :], acc / l[:, None], mask=o_mask)
    tl.store(m_out + bh * S + rows, m, mask=i_ok)
    tl.store(l_out + bh * S + rows, l, mask=i_ok)


@triton.jit
def _chunk_attn_dq_kernel(
    q,  # (BH, S, D)
    k,  # (BH, S, D)
    v,  # (BH, S, DV)
    pos,  # (BH, S) int32
    ok,  # (B, T) int32
    seg,  # (B, T) int32
    do,  # (BH, S, DV) gradient of the output
    m_in,  # (BH, S) row max of the forward
    l_in,  # (BH, S) row sum of the forward
    g_in,  # (BH, S) do . out - dlse
    dq,  # (BH, S, D) accumulator dtype
    H,
    T,
    S,
    NC,
    C,
    BEFORE,
    WINDOW,
    D,
    DV,
    CAUSAL: tl.constexpr,
    SELF: tl.constexpr,
    HAS_SEG: tl.constexpr,
    MASKED: tl.constexpr,
    OWN: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    ACC = dq.dtype.element_ty
    i = tl.arange(0, BC)
    i_ok = i < C
    rows = c * C + i
    q_blk = _load_rows(q + bh * S * D, rows, i_ok, D, BD)
    do_blk = _load_rows(do + bh * S * DV, rows, i_ok, DV, BDV)
    pos_q, q_is_key, seg_q = _load_slots(pos + bh * S, ok + b * T, seg + b * T, rows, i_ok, HAS_SEG)
    m = tl.load(m_in + bh * S + rows, mask=i_ok, other=0.0)
    l = tl.load(l_in + bh * S + rows, mask=i_ok, other=1.0)
    g = tl.load(g_in + bh * S + rows, mask=i_ok, other=0.0)
    acc = tl.zeros((BC, BD), dtype=ACC)
    for w in range(WINDOW):
        cols = (c + w - BEFORE + BEFORE * NC) % NC * C + i
        k_blk = _load_rows(k + bh * S * D, cols, i_ok, D, BD)
        v_blk = _load_rows(v + bh * S * DV, cols, i_ok, DV, BDV)
        pos_k, key_ok, seg_k = _load_slots(pos + bh * S, ok + b * T, seg + b * T, cols, i_ok, HAS_SEG)
        s = tl.dot(q_blk, tl.trans(k_blk), input_precision=PRECISION).to(ACC)
        s, free = _masked_scores(
            s, pos_q, pos_k, seg_q, seg_k, key_ok, i_ok, CAUSAL, SELF, HAS_SEG, MASKED, OWN
        )
        p = tl.exp(s - m[:, None]) / l[:, None]
        dp = tl.dot(do_blk, tl.trans(v_blk), input_precision=PRECISION).to(ACC)
        ds = tl.where(free & i_ok[:, None], p * (dp - g[:, None]), 0.0)
        acc += tl.dot(ds.to(k_blk.dtype), k_blk, input_precision=PRECISION).to(ACC)
    d = tl.arange(0, BD)
    tl.store(dq + bh * S * D + rows[:, None] * D + d[None, :], acc, mask=i_ok[:, None] & (d[None, :] < D))


@triton.jit
def _chunk_attn_dkv_kernel(
    q,  # (BH, S, D)
    k,  # (BH, S, D)
    v,  # (BH, S, DV)
    pos,  # (BH, S) int32
    ok,  # (B, T) int32
    seg,  # (B, T) int32
    do,  # (BH, S, DV)
    m_in,  # (BH, S)
    l_in,  # (BH, S)
    g_in,  # (BH, S)
    dk,  # (BH, S, D) accumulator dtype
    dv,  # (BH, S, DV) accumulator dtype
    H,
    T,
    S,
    NC,
    C,
    BEFORE,
    WINDOW,
    D,
    DV,
    CAUSAL: tl.constexpr,
    SELF: tl.constexpr,
    HAS_SEG: tl.constexpr,
    MASKED: tl.constexpr,
    OWN: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    ACC = dk.dtype.element_ty
    j = tl.arange(0, BC)
    j_ok = j < C
    cols = c * C + j
    k_blk = _load_rows(k + bh * S * D, cols, j_ok, D, BD)
    v_blk = _load_rows(v + bh * S * DV, cols, j_ok, DV, BDV)
    pos_k, key_ok, seg_k = _load_slots(pos + bh * S, ok + b * T, seg + b * T, cols, j_ok, HAS_SEG)
    acc_k = tl.zeros((BC, BD), dtype=ACC)
    acc_v = tl.zeros((BC, BDV), dtype=ACC)
    for w in range(WINDOW):
        # the query chunk whose window reaches this chunk at offset w - before (a chunk may be reached twice)
        rows = (c - w + BEFORE + WINDOW * NC) % NC * C + j
        q_blk = _load_rows(q + bh * S * D, rows, j_ok, D, BD)
        do_blk = _load_rows(do + bh * S * DV, rows, j_ok, DV, BDV)
        pos_q, q_is_key, seg_q = _load_slots(pos + bh * S, ok + b * T, seg + b * T, rows, j_ok, HAS_SEG)
        m = tl.load(m_in + bh * S + rows, mask=j_ok, other=0.0)
        l = tl.load(l_in + bh * S + rows, mask=j_ok, other=1.0)
        g = tl.load(g_in + bh * S + rows, mask=j_ok, other=0.0)
        s = tl.dot(q_blk, tl.trans(k_blk), input_precision=PRECISION).to(ACC)
        s, free = _masked_scores(
            s, pos_q, pos_k, seg_q, seg_k, key_ok, j_ok, CAUSAL, SELF, HAS_SEG, MASKED, OWN
        )
        p = tl.where(j_ok[:, None], tl.exp(s - m[:, None]) / l[:, None], 0.0)
        dp = tl.dot(do_blk, tl.trans(v_blk), input_precision=PRECISION).to(ACC)
        ds = tl.where(free & j_ok[:, None], p * (dp - g[:, None]), 0.0)
        acc_v += tl.dot(tl.trans(p.to(do_blk.dtype)), do_blk, input_precision=PRECISION).to(ACC)
        acc_k += tl.dot(tl.trans(ds.to(q_blk.dtype)), q_blk, input_precision=PRECISION).to(ACC)
    d = tl.arange(0, BD)
    tl.store(dk + bh * S * D + cols[:, None] * D + d[None, :], acc_k, mask=j_ok[:, None] & (d[None, :] < D))
    e = tl.arange(0, BDV)
    tl.store(
        dv + bh * S * DV + cols[:, None] * DV + e[None, :], acc_v, mask=j_ok[:, None] & (e[None, :] < DV)
    )


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype) -> str:
    # tf32 would cost ~1e-3 relative error on float32 inputs; 16-bit inputs hold less than tf32 anyway
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _block(n: int) -> int:
    """A block holding n (at least 16: the smallest dot Triton compiles)."""
    return max(16, triton.next_power_of_2(n))


class _SortedChunkAttention(torch.autograd.Function):
    """q, k (B, H, S, D), v (B, H, S, Dv) in slot order -> out (B, H, S, Dv), lse (B, H, S)."""

    @staticmethod
    def forward(ctx, q, k, v, pos, ok, seg, C, before, after, causal, self_rule):
        B, H, S, D = q.shape
        DV = v.shape[-1]
        q, k, v = (x.contiguous() for x in (q, k, v))
        acc = _acc(q.dtype)
        out = torch.empty(B, H, S, DV, dtype=acc, device=q.device)
        m, l = (torch.empty(B, H, S, dtype=acc, device=q.device) for _ in range(2))
        masked, own = mask_values(q.dtype)
        meta = dict(
            H=H,
            T=ok.shape[1],
            S=S,
            NC=S // C,
            C=C,
            BEFORE=before,
            WINDOW=before + 1 + after,
            D=D,
            DV=DV,
            CAUSAL=causal,
            SELF=self_rule,
            HAS_SEG=seg is not None,
            MASKED=masked,
            OWN=own,
            BC=_block(C),
            BD=_block(D),
            BDV=_block(DV),
            PRECISION=_precision(q.dtype),
            # 64 x 64 blocks and up: 8 warps spill far less (sm_80 / sm_90, float32 and bfloat16)
            num_warps=8 if _block(C) * _block(max(D, DV)) >= 64 * 64 else 4,
        )
        seg_arg = ok if seg is None else seg
        grid = (S // C, B * H)
        _chunk_attn_fwd_kernel[grid](q, k, v, pos, ok, seg_arg, out, m, l, **meta)
        ctx.save_for_backward(q, k, v, pos, ok, seg_arg, out, m, l)
        ctx.meta, ctx.grid = meta, grid
        return out.to(q.dtype), (m + torch.log(l)).to(q.dtype)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, pos, ok, seg, out, m, l = ctx.saved_tensors
        acc = out.dtype
        do = dout.to(q.dtype).contiguous()
        # ds = p (do . v - g) with g = do . out - dlse
        g = ((do.to(acc) * out).sum(-1) - dlse.to(acc)).contiguous()
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk = torch.empty(k.shape, dtype=acc, device=q.device)
        dv = torch.empty(v.shape, dtype=acc, device=q.device)
        _chunk_attn_dq_kernel[ctx.grid](q, k, v, pos, ok, seg, do, m, l, g, dq, **ctx.meta)
        _chunk_attn_dkv_kernel[ctx.grid](q, k, v, pos, ok, seg, do, m, l, g, dk, dv, **ctx.meta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


def _attend(q, k, v, slots, T, key_padding_mask, segment_ids, C, before, after, causal, self_rule):
    """The kernels over q, k (B, H, S, D), v (B, H, S, Dv) in slot order; ``slots`` (B, H, S) the position of
    each slot in a sequence of T. Returns out (B, H, S, Dv), lse (B, H, S)."""
    ok = chunk._key_ok(key_padding_mask, q.shape[0], T, q.device).to(torch.int32)
    seg = None if segment_ids is None else segment_ids.to(torch.int32).contiguous()
    pos = slots.to(torch.int32).contiguous()
    return _SortedChunkAttention.apply(q, k, v, pos, ok, seg, C, before, after, causal, self_rule)


def triton_lsh_attention(
    qk, v, buckets, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout=0.0
):
    """The op with the Triton chunk attention; arguments and result as ``chunk.chunk_lsh_attention``."""
    if dropout > 0:
        return chunk.chunk_lsh_attention(
            qk, v, buckets, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout
        )
    B, T, H, D = qk.shape
    qk_h, v_h = qk.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    keys = chunk.shared_keys(qk_h)
    order, c = chunk.sorted_order(buckets, chunk_length)
    if T <= chunk_length:
        before = after = 0
    slots = order.reshape(B, H, -1)  # (B, H, n * T)
    q, k, vv = (chunk._gather_tokens(x, slots) for x in (qk_h, keys, v_h))
    out, lse = _attend(q, k, vv, slots, T, key_padding_mask, segment_ids, c, before, after, causal, True)
    return chunk.combine_rounds(out, lse, order)


def triton_local_attention(
    q, k, v, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout=0.0
):
    """The op with the Triton chunk attention; arguments and result as ``chunk.chunk_local_attention``."""
    if dropout > 0:
        return chunk.chunk_local_attention(
            q, k, v, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout
        )
    B, T, H, D = q.shape
    if T <= chunk_length:
        before = after = 0
    slots = torch.arange(T, device=q.device).expand(B, H, T)
    q_h, k_h, v_h = q.transpose(1, 2), (k * D**-0.5).transpose(1, 2), v.transpose(1, 2)
    out, _ = _attend(
        q_h,
        k_h,
        v_h,
        slots,
        T,
        key_padding_mask,
        segment_ids,
        min(chunk_length, T),
        before,
        after,
        causal,
        False,
    )
    return out.transpose(1, 2)
