"""The short causal depthwise convolution as Triton kernels, forward and backward, in ``torch.autograd.Function``.

Same op as ``naive.py`` (the convolution in front of the SSM in Mamba, Gu & Dao 2023, arXiv:2312.00752, section
3.4). Every sequence n is its inputs with its K - 1 inputs of history in front (its initial state, or zeros),

    xs_n = [h0_n[0], ..., h0_n[K - 2], x_bos, ..., x_{eos - 1}]         (length K - 1 + L_n, L_n = eos - bos)
    y_t  = act(bias + sum_k w[k] xs_n[t - bos + k])                    final_n = the last K - 1 entries of xs_n

and the backward, with g_t = dy_t act'(pre_t), runs the same taps the other way round:

    dxs_n[i] = sum_k w[k] g_{bos + i - k} + dfinal_n[i - L_n]          (terms whose index falls outside dropped)
    dw[k]    = sum_t g_t xs_n[t - bos + k]        dbias = sum_t g_t     dx_t = dxs_n[t - bos + K - 1]   dh0_n = dxs_n[:K - 1]

Kernels, each over blocks of BT tokens and BC channels (channels are contiguous in memory: coalesced loads):
``_fwd_kernel`` (y), ``_dpre_kernel`` (g, recomputing pre, and per-block partial sums of dw, reduced by torch),
``_dx_kernel`` (dx) and ``_state_kernel`` (per sequence: the final state in the forward, dh0 in the backward,
both K - 1 slots picked from the history and the sequence's last inputs); where each tap reads from is in
``_triton_taps.py``. A token finds its sequence through
``cu_seqlens`` (a per-token sequence index made once by torch) when packed, and is the row of the batch otherwise;
no tap crosses a sequence's start or end. Sums run in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.ops.causal_conv1d import chunk
from zoo.ops.causal_conv1d._triton_taps import _bounds, _history, _pre
from zoo.ops.causal_conv1d.naive import compute_dtype

# tokens and channels per program (untuned): a (16, 64) float32 tile is 8 values per thread over 4 warps
BT, BC = 16, 64


@triton.jit
def _fwd_kernel(
    x,  # (R, T, C)
    w,  # (C, K)
    b,  # (C,), read if USE_BIAS
    h0,  # (S, C, K - 1), read if USE_H0
    y,  # (R, T, C) in the accumulator dtype
    seq_of_token,  # (T,) int32, read if PACKED (then R == 1)
    cu_seqlens,  # (S + 1,), read if PACKED
    T,
    C,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    SILU: tl.constexpr,
    USE_BIAS: tl.constexpr,
    USE_H0: tl.constexpr,
    PACKED: tl.constexpr,
):
    i_t, i_c, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ACC = y.dtype.element_ty
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = t < T, c < C
    seq, bos, _ = _bounds(seq_of_token, cu_seqlens, row, t, m_t, T, PACKED)
    x_row = x + row.to(tl.int64) * T * C
    out = _pre(x_row, w, b, h0, seq, bos, t, c, m_t, m_c, T, C, K, ACC, USE_BIAS, USE_H0)
    if SILU:
        out = out * tl.sigmoid(out)
    p_y = y + row.to(tl.int64) * T * C + t[:, None] * C + c[None, :]
    tl.store(p_y, out, mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _dpre_kernel(
    x,  # (R, T, C)
    w,  # (C, K)
    b,  # (C,), read if USE_BIAS
    h0,  # (S, C, K - 1), read if USE_H0
    dy,  # (R, T, C)
    g,  # (R, T, C) out: dy act'(pre), in the accumulator dtype
    dw,  # (R * cdiv(T, BT), C, K) out: each block's share of dw
    seq_of_token,
    cu_seqlens,
    T,
    C,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    SILU: tl.constexpr,
    USE_BIAS: tl.constexpr,
    USE_H0: tl.constexpr,
    PACKED: tl.constexpr,
):
    i_t, i_c, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ACC = g.dtype.element_ty
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = t < T, c < C
    m = m_t[:, None] & m_c[None, :]
    seq, bos, _ = _bounds(seq_of_token, cu_seqlens, row, t, m_t, T, PACKED)
    x_row = x + row.to(tl.int64) * T * C
    p_tc = row.to(tl.int64) * T * C + t[:, None] * C + c[None, :]
    b_g = tl.load(dy + p_tc, mask=m, other=0.0).to(ACC)
    if SILU:
        pre = _pre(x_row, w, b, h0, seq, bos, t, c, m_t, m_c, T, C, K, ACC, USE_BIAS, USE_H0)
        sig = tl.sigmoid(pre)
        b_g = b_g * sig * (1 + pre * (1 - sig))
    tl.store(g + p_tc, b_g, mask=m)
    block = row * tl.num_programs(0) + i_t
    for k in tl.static_range(K):
        x_k = _history(x_row, h0, seq, bos, t - (K - 1) + k, c, m_t, m_c, T, C, K, USE_H0)
        tl.store(dw + (block.to(tl.int64) * C + c) * K + k, tl.sum(b_g * x_k.to(ACC), axis=0), mask=m_c)


@triton.jit
def _dx_kernel(
    g,  # (R, T, C)
    w,  # (C, K)
    dfinal,  # (S, C, K - 1), read if USE_DFINAL
    dx,  # (R, T, C) out, in the accumulator dtype
    seq_of_token,
    cu_seqlens,
    T,
    C,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    USE_DFINAL: tl.constexpr,
    PACKED: tl.constexpr,
):
    i_t, i_c, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ACC = dx.dtype.element_ty
    s = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    m_s, m_c = s < T, c < C
    seq, _, eos = _bounds(seq_of_token, cu_seqlens, row, s, m_s, T, PACKED)
    g_row = g + row.to(tl.int64) * T * C
    acc = tl.zeros([BT, BC], dtype=ACC)
    # input s meets tap k at output t = s + K - 1 - k, while t is in s's sequence
    for k in tl.static_range(K):
        t = s + (K - 1 - k)
        m = (m_s & (t < eos))[:, None] & m_c[None, :]
        w_k = tl.load(w + c * K + k, mask=m_c, other=0.0).to(ACC)
        acc += w_k[None, :] * tl.load(g_row + t[:, None] * C + c[None, :], mask=m, other=0.0)
    if USE_DFINAL:
        # the last K - 1 inputs of a sequence are its final state, slot j = s - eos + K - 1
        slot = s - eos + (K - 1)
        m = (m_s & (slot >= 0))[:, None] & m_c[None, :]
        p = dfinal + seq[:, None] * C * (K - 1) + c[None, :] * (K - 1) + slot[:, None]
        acc += tl.load(p, mask=m, other=0.0).to(ACC)
    p_dx = dx + row.to(tl.int64) * T * C + s[:, None] * C + c[None, :]
    tl.store(p_dx, acc, mask=m_s[:, None] & m_c[None, :])


@triton.jit
def _state_kernel(
    src,  # (R, T, C): x (forward) or g (backward)
    w,  # (C, K), read if BACKWARD
    state,  # (S, C, K - 1): h0 (forward) or dfinal (backward), read if USE_STATE
    out,  # (S, C, K - 1) out: the final state (forward) or dh0 (backward)
    cu_seqlens,  # (S + 1,), read if PACKED
    T,
    C,
    K: tl.constexpr,
    BJ: tl.constexpr,  # >= K - 1
    BC: tl.constexpr,
    BACKWARD: tl.constexpr,
    USE_STATE: tl.constexpr,
    PACKED: tl.constexpr,
):
    i_c, n = tl.program_id(0), tl.program_id(1)
    if PACKED:
        row = n * 0
        bos = tl.load(cu_seqlens + n).to(tl.int32)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int32)
    else:
        row = n
        bos = 0
        eos = T
    ACC = out.dtype.element_ty
    j = tl.arange(0, BJ)
    c = i_c * BC + tl.arange(0, BC)
    m_j, m_c = j < K - 1, c < C
    m = m_j[:, None] & m_c[None, :]
    src_row = src + row.to(tl.int64) * T * C
    p_state = n * C * (K - 1) + c[None, :] * (K - 1) + j[:, None]  # (BJ, BC) block of state n, slot-major
    length = eos - bos
    acc = tl.zeros([BJ, BC], dtype=ACC)
    if BACKWARD:
        # dh0[j] = sum_k w[k] g_{bos + j - k} over outputs inside the sequence, + dfinal[j - L]
        for k in tl.static_range(K):
            t = bos + j - k
            m_k = (m_j & (t >= bos) & (t < eos))[:, None] & m_c[None, :]
            w_k = tl.load(w + c * K + k, mask=m_c, other=0.0).to(ACC)
            acc += w_k[None, :] * tl.load(src_row + t[:, None] * C + c[None, :], mask=m_k, other=0.0).to(ACC)
        if USE_STATE:
            m_k = m & ((j - length) >= 0)[:, None]
            acc += tl.load(state + p_state - length, mask=m_k, other=0.0).to(ACC)
    else:
        # final[j] = xs[L + j]: input eos - (K - 1) + j, or initial state slot L + j when that is before bos
        s = eos - (K - 1) + j
        m_k = (m_j & (s >= bos))[:, None] & m_c[None, :]
        acc += tl.load(src_row + s[:, None] * C + c[None, :], mask=m_k, other=0.0).to(ACC)
        if USE_STATE:
            m_k = m & (s < bos)[:, None]
            acc += tl.load(state + p_state + length, mask=m_k, other=0.0).to(ACC)
    tl.store(out + p_state, acc, mask=m)


def _launch_state(src, w, state, out, cu, R, T, C, K, backward: bool, packed: bool) -> None:
    BJ = max(triton.next_power_of_2(K - 1), 2)
    grid = (triton.cdiv(C, BC), out.shape[0])
    _state_kernel[grid](
        src, w, out if state is None else state, out, cu, T, C,
        K=K, BJ=BJ, BC=BC, BACKWARD=backward, USE_STATE=state is not None, PACKED=packed, num_warps=2,
    )  # fmt: skip


class _CausalConv1d(torch.autograd.Function):
    """x (R, T, C); weight (C, K); bias (C,) or None; h0 (S, C, K - 1) or None; cu_seqlens (S + 1,) or None (then
    S = R). Returns y (R, T, C) in the dtype of x and the final state (S, C, K - 1) in the dtype of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, h0, cu_seqlens, silu, output_final_state):
        R, T, C = x.shape
        K = weight.shape[1]
        acc = compute_dtype(x.dtype)
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        packed = cu_seqlens is not None
        if packed:
            cu = cu_seqlens.to(device=x.device, dtype=torch.int64).contiguous()
            seq_of_token = torch.bucketize(torch.arange(T, device=x.device), cu[1:], right=True).to(
                torch.int32
            )
        else:
            cu = seq_of_token = x  # never read
        S = cu.numel() - 1 if packed else R
        y = torch.empty(R, T, C, dtype=acc, device=x.device)
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), R)
        _fwd_kernel[grid](
            x, weight, x if bias is None else bias, x if h0 is None else h0, y, seq_of_token, cu, T, C,
            K=K, BT=BT, BC=BC, SILU=silu, USE_BIAS=bias is not None, USE_H0=h0 is not None, PACKED=packed,
            num_warps=4,
        )  # fmt: skip
        final = None
        if output_final_state:
            final = torch.empty(S, C, K - 1, dtype=acc, device=x.device)
            if K > 1:
                _launch_state(x, weight, h0, final, cu, R, T, C, K, backward=False, packed=packed)
            final = final.to(x.dtype)
        ctx.save_for_backward(x, weight, bias, h0, cu, seq_of_token)
        ctx.silu, ctx.packed = silu, packed
        ctx.set_materialize_grads(False)
        return y.to(x.dtype), final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, h0, cu, seq_of_token = ctx.saved_tensors
        R, T, C = x.shape
        K = weight.shape[1]
        acc = compute_dtype(x.dtype)
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None or K == 1 else dfinal.contiguous()
        n_blocks = triton.cdiv(T, BT)
        grid = (n_blocks, triton.cdiv(C, BC), R)
        g = torch.empty(R, T, C, dtype=acc, device=x.device)
        dw = torch.empty(R * n_blocks, C, K, dtype=acc, device=x.device)
        _dpre_kernel[grid](
            x, weight, x if bias is None else bias, x if h0 is None else h0, dy, g, dw, seq_of_token, cu, T, C,
            K=K, BT=BT, BC=BC, SILU=ctx.silu, USE_BIAS=bias is not None, USE_H0=h0 is not None,
            PACKED=ctx.packed, num_warps=4,
        )  # fmt: skip
        dx = torch.empty(R, T, C, dtype=acc, device=x.device)
        _dx_kernel[grid](
            g, weight, g if dfinal is None else dfinal, dx, seq_of_token, cu, T, C,
            K=K, BT=BT, BC=BC, USE_DFINAL=dfinal is not None, PACKED=ctx.packed, num_warps=4,
        )  # fmt: skip
        dh0 = None
        if h0 is not None and ctx.needs_input_grad[3]:
            dh0 = torch.empty(h0.shape, dtype=acc, device=x.device)
            if K > 1:
                _launch_state(g, weight, dfinal, dh0, cu, R, T, C, K, backward=True, packed=ctx.packed)
            dh0 = dh0.to(h0.dtype)
        dbias = None if bias is None else g.sum((0, 1)).to(bias.dtype)
        return dx.to(x.dtype), dw.sum(0).to(weight.dtype), dbias, dh0, None, None, None


def triton_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The convolution with the Triton kernels; arguments as ``naive.naive_causal_conv1d``."""
    if x.shape[1] == 0:  # nothing to convolve: the state passes on (no kernel to launch)
        return chunk.chunk_causal_conv1d(
            x, weight, bias, activation, initial_state, output_final_state, cu_seqlens
        )
    with torch.autocast(x.device.type, enabled=False):
        y, final = _CausalConv1d.apply(
            x, weight, bias, initial_state, cu_seqlens, activation is not None, output_final_state
        )
    return y, final
