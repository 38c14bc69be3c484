"""RWKV-4's WKV as Triton kernels, forward and backward, in ``torch.autograd.Function``.

RWKV (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048, eq. 14 and appendix D;
see ``naive.py``), walked token by token as the paper's own CUDA kernel walks it: one program owns a block of BC
channels of one sequence and holds their (numerator, denominator, max) state in registers from the first token to
the last,

    m = max(max, u + k_t)         wkv_t = (e^{max - m} num + e^{u + k_t - m} v_t) / (e^{max - m} den + e^{u + k_t - m})
    max' = max(max + w, k_t)      num' = e^{max + w - max'} num + e^{k_t - max'} v_t      (den' alike, with 1)

every exponent <= 0, reading k and v once and writing wkv once. The recurrence is elementwise per channel, so there
is nothing for a matmul to do and no chunking to gain.

Backward: the reverse walk, from the last token to the first, carrying the gradient of the state (dnum, dden,
dmax) as the exact derivative of the max-tracking recurrence above (so that a gradient given for the final state's
max is honoured too). Per token, with x1 = max + w, x2 = k_t and their larger m' (the new max),

    df1 = dnum' num + dden' den,  df2 = dnum' v_t + dden',   dx1 = df1 e^{x1 - m'},  dx2 = df2 e^{x2 - m'}
    dm' = dmax' - dx1 - dx2, passed on to the larger of x1, x2 (half to each on a tie, as ``torch.maximum``)
    dnum = dnum' e^{x1 - m'} + ...,  dden alike,  dmax = dx1 + ...,  dw += dx1,  dk_t = dx2 + ...,  dv_t = dnum' e^{x2 - m'} + ...

and the output's terms (...): wkv_t does not depend on its shift m, which is held fixed, so with N, D its numerator
and denominator, dN = dwkv / D, dD = -dwkv wkv / D feed num, den, max through e^{max - m} and u + k_t (hence du, dk_t)
through e^{u + k_t - m}. The reverse walk needs the state before every token: the backward runs the forward kernel
again, writing those states (3 numbers per channel and token) to a buffer that lives during the backward only.

Sequences are addressed through ``cu_seqlens`` when packed (batch 1), and as B packed sequences of length T
otherwise. The state is kept in float32 (float64 inputs are computed in float32 too, and the final state returned in
float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.ops.wkv4.naive import EMPTY_MAX, state_dtype

_EMPTY_MAX = tl.constexpr(EMPTY_MAX)  # the max of the empty state, as a constant the kernel can read


@triton.jit
def _wkv4_fwd_kernel(
    w,  # (C,) log-decay per token, < 0
    u,  # (C,) bonus of the current token
    k,  # (TT, C) packed tokens
    v,  # (TT, C)
    o,  # (TT, C) output
    h0,  # (N, 3, C) initial (numerator, denominator, max), read if USE_H0
    ht,  # (N, 3, C) float32: the final states
    hs,  # (TT, 3, C) float32: the state before every token, written if STORE_STATES
    cu_seqlens,  # (N + 1,) sequence boundaries in the packed token axis
    C: tl.constexpr,
    BC: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_STATES: tl.constexpr,
):
    i_c, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C

    b_w = tl.load(w + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_u = tl.load(u + o_c, mask=m_c, other=0.0).to(tl.float32)
    if USE_H0:
        b_num = tl.load(h0 + (i_n * 3 + 0) * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_den = tl.load(h0 + (i_n * 3 + 1) * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_max = tl.load(h0 + (i_n * 3 + 2) * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    else:
        b_num = tl.zeros([BC], dtype=tl.float32)
        b_den = tl.zeros([BC], dtype=tl.float32)
        b_max = tl.full([BC], _EMPTY_MAX, dtype=tl.float32)
    for t in range(bos, eos):
        b_k = tl.load(k + t * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_v = tl.load(v + t * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        if STORE_STATES:
            tl.store(hs + (t * 3 + 0) * C + o_c, b_num, mask=m_c)
            tl.store(hs + (t * 3 + 1) * C + o_c, b_den, mask=m_c)
            tl.store(hs + (t * 3 + 2) * C + o_c, b_max, mask=m_c)
        # the output: past tokens and the current one with its bonus, shifted by their larger exponent
        m = tl.maximum(b_max, b_u + b_k)
        e1, e2 = tl.exp(b_max - m), tl.exp(b_u + b_k - m)
        tl.store(
            o + t * C + o_c, ((e1 * b_num + e2 * b_v) / (e1 * b_den + e2)).to(o.dtype.element_ty), mask=m_c
        )
        # the state after the token: decayed past plus the token, no bonus
        m = tl.maximum(b_max + b_w, b_k)
        e1, e2 = tl.exp(b_max + b_w - m), tl.exp(b_k - m)
        b_num = e1 * b_num + e2 * b_v
        b_den = e1 * b_den + e2
        b_max = m
    tl.store(ht + (i_n * 3 + 0) * C + o_c, b_num, mask=m_c)
    tl.store(ht + (i_n * 3 + 1) * C + o_c, b_den, mask=m_c)
    tl.store(ht + (i_n * 3 + 2) * C + o_c, b_max, mask=m_c)


@triton.jit
def _wkv4_bwd_kernel(
    w,  # (C,)
    u,  # (C,)
    k,  # (TT, C)
    v,  # (TT, C)
    hs,  # (TT, 3, C) float32: the state before every token
    do,  # (TT, C) gradient of the output
    dht,  # (N, 3, C) gradient of the final states, read if USE_DHT
    dk,  # (TT, C) float32
    dv,  # (TT, C) float32
    dw,  # (N, C) float32: each sequence's share of dw
    du,  # (N, C) float32: each sequence's share of du
    dh0,  # (N, 3, C) float32: gradient of the initial states
    cu_seqlens,
    C: tl.constexpr,
    BC: tl.constexpr,
    USE_DHT: tl.constexpr,
):
    i_c, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C

    b_w = tl.load(w + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_u = tl.load(u + o_c, mask=m_c, other=0.0).to(tl.float32)
    # the gradient of the state after the token being walked back over
    d_num = tl.zeros([BC], dtype=tl.float32)
    d_den = tl.zeros([BC], dtype=tl.float32)
    d_max = tl.zeros([BC], dtype=tl.float32)
    if USE_DHT:
        d_num += tl.load(dht + (i_n * 3 + 0) * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        d_den += tl.load(dht + (i_n * 3 + 1) * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        d_max += tl.load(dht + (i_n * 3 + 2) * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BC], dtype=tl.float32)
    b_du = tl.zeros([BC], dtype=tl.float32)
    for i in range(0, eos - bos):
        t = eos - 1 - i
        b_k = tl.load(k + t * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_v = tl.load(v + t * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_do = tl.load(do + t * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_num = tl.load(hs + (t * 3 + 0) * C + o_c, mask=m_c, other=0.0)
        b_den = tl.load(hs + (t * 3 + 1) * C + o_c, mask=m_c, other=0.0)
        b_max = tl.load(hs + (t * 3 + 2) * C + o_c, mask=m_c, other=0.0)

        # 1. the state update: max' = max(x1, x2), num' = e^{x1 - max'} num + e^{x2 - max'} v (den' with 1)
        x1 = b_max + b_w
        m = tl.maximum(x1, b_k)
        f1, f2 = tl.exp(x1 - m), tl.exp(b_k - m)
        dx1 = (d_num * b_num + d_den * b_den) * f1
        dx2 = (d_num * b_v + d_den) * f2
        dm = d_max - dx1 - dx2
        # the max passes its gradient to the larger exponent, half to each on a tie (as torch.maximum)
        share = tl.where(x1 > b_k, 1.0, tl.where(x1 == b_k, 0.5, 0.0))
        dx1 += dm * share
        dx2 += dm * (1.0 - share)
        b_dk = dx2
        b_dv = d_num * f2
        b_dw += dx1
        n_num = d_num * f1
        n_den = d_den * f1
        n_max = dx1

        # 2. the output, (e1 num + e2 v) / (e1 den + e2) with its shift m held fixed (it does not depend on it)
        m = tl.maximum(b_max, b_u + b_k)
        e1, e2 = tl.exp(b_max - m), tl.exp(b_u + b_k - m)
        den_o = e1 * b_den + e2
        dN = b_do / den_o
        dD = -dN * (e1 * b_num + e2 * b_v) / den_o
        n_num += dN * e1
        n_den += dD * e1
        n_max += (dN * b_num + dD * b_den) * e1
        d_uk = (dN * b_v + dD) * e2
        b_dk += d_uk
        b_du += d_uk
        b_dv += dN * e2
        tl.store(dk + t * C + o_c, b_dk, mask=m_c)
        tl.store(dv + t * C + o_c, b_dv, mask=m_c)
        d_num, d_den, d_max = n_num, n_den, n_max
    tl.store(dh0 + (i_n * 3 + 0) * C + o_c, d_num, mask=m_c)
    tl.store(dh0 + (i_n * 3 + 1) * C + o_c, d_den, mask=m_c)
    tl.store(dh0 + (i_n * 3 + 2) * C + o_c, d_max, mask=m_c)
    tl.store(dw + i_n * C + o_c, b_dw, mask=m_c)
    tl.store(du + i_n * C + o_c, b_du, mask=m_c)


# channels per program: small blocks, so that a (B * C)-channel batch fills the GPU's multiprocessors (untuned)
BLOCK_CHANNELS = 128


def block_channels(C: int) -> int:
    """Channels per program: up to ``BLOCK_CHANNELS``, at least 16."""
    return min(BLOCK_CHANNELS, max(16, triton.next_power_of_2(C)))


def _walk(w, u, k, v, h0, cu, store_states: bool):
    """The forward kernel over packed k, v (TT, C): (out, final states, and the state before every token or None)."""
    TT, C = k.shape
    N = cu.numel() - 1
    o = torch.empty_like(v)
    ht = k.new_empty(N, 3, C, dtype=torch.float32)
    hs = k.new_empty(TT, 3, C, dtype=torch.float32) if store_states else None
    BC = block_channels(C)
    _wkv4_fwd_kernel[(triton.cdiv(C, BC), N)](
        w, u, k, v, o, ht if h0 is None else h0, ht, ht if hs is None else hs, cu,
        C=C, BC=BC, USE_H0=h0 is not None, STORE_STATES=store_states, num_warps=1,
    )  # fmt: skip
    return o, ht, hs


class _WKV4(torch.autograd.Function):
    """w, u (C,); k, v (B, T, C); initial_state (N, 3, C) or None; cu_seqlens (N + 1,) or None (then N = B)."""

    @staticmethod
    def forward(ctx, w, u, k, v, initial_state, cu_seqlens):
        B, T, C = k.shape
        if cu_seqlens is None:  # a regular batch is B packed sequences of length T
            cu = torch.arange(0, B + 1, device=k.device, dtype=torch.int64) * T
        else:
            cu = cu_seqlens.to(device=k.device, dtype=torch.int64)
        cu = cu.contiguous()
        w, u = w.contiguous(), u.contiguous()
        kk, vv = k.reshape(B * T, C).contiguous(), v.reshape(B * T, C).contiguous()
        h0 = None if initial_state is None else initial_state.contiguous()
        o, ht, _ = _walk(w, u, kk, vv, h0, cu, store_states=False)
        ctx.save_for_backward(w, u, kk, vv, h0, cu)
        ctx.shape = (B, T, C)
        ctx.dtypes = (w.dtype, u.dtype, k.dtype, v.dtype, None if h0 is None else h0.dtype)
        ctx.set_materialize_grads(False)
        final = ht.to(state_dtype(k.dtype))
        if h0 is not None:  # an empty sequence passes its initial state on exactly, not rounded to float32
            final = torch.where((cu[1:] == cu[:-1])[:, None, None], h0.to(final.dtype), final)
        return o.view(B, T, C), final

    @staticmethod
    def backward(ctx, dout, dfinal):
        w, u, k, v, h0, cu = ctx.saved_tensors
        TT, C = k.shape
        N = cu.numel() - 1
        # the state before every token, recomputed (the forward keeps none)
        _, _, hs = _walk(w, u, k, v, h0, cu, store_states=True)
        do = torch.zeros_like(v) if dout is None else dout.reshape(TT, C).contiguous()
        dht = None if dfinal is None else dfinal.contiguous()
        f32 = {"dtype": torch.float32, "device": k.device}
        dk, dv = torch.empty(TT, C, **f32), torch.empty(TT, C, **f32)
        dw, du, dh0 = torch.empty(N, C, **f32), torch.empty(N, C, **f32), torch.empty(N, 3, C, **f32)
        BC = block_channels(C)
        _wkv4_bwd_kernel[(triton.cdiv(C, BC), N)](
            w, u, k, v, hs, do, dh0 if dht is None else dht, dk, dv, dw, du, dh0, cu,
            C=C, BC=BC, USE_DHT=dht is not None, num_warps=1,
        )  # fmt: skip
        w_dtype, u_dtype, k_dtype, v_dtype, h0_dtype = ctx.dtypes
        grads = (
            dw.sum(0).to(w_dtype),  # w and u are shared by all sequences
            du.sum(0).to(u_dtype),
            dk.view(ctx.shape).to(k_dtype),
            dv.view(ctx.shape).to(v_dtype),
            None if h0_dtype is None else dh0.to(h0_dtype),
        )
        return (*(x if need else None for x, need in zip(grads, ctx.needs_input_grad)), None)


def triton_wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """WKV on the Triton kernels, forward and backward. k, v (B, T, C); w, u (C,); states (B, 3, C), or one per
    packed sequence (``cu_seqlens``, B == 1)."""
    out, final = _WKV4.apply(w, u, k, v, initial_state, cu_seqlens)
    return out, (final if output_final_state else None)
