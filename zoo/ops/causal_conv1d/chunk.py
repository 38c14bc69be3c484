"""The short causal depthwise convolution in PyTorch: the CPU fast path and the fallback everywhere.

Same op as ``naive.py`` (the convolution of Mamba, Gu & Dao 2023, arXiv:2312.00752, section 3.4):
y_t[c] = act(bias[c] + sum_k weight[c, k] x_{t-K+1+k}[c]).

Whole sequences (no ``cu_seqlens``) run as ``_TapSum``, an autograd.Function over the channels-last input as it
comes (any strides, such as a slice of a fused projection): K multiply-adds of shifted slices of x into the
pre-activation, the SiLU, and a hand-written backward (the SiLU's, then K shifted multiply-adds for dx and K
reductions over time for dweight), the backward a block of rows at a time so that its passes read from cache
(``zoo.ops.blocking``; on a CPU about 2.5x faster than whole-sequence passes at T = 2048, C = 544, with the data out
of cache to begin with). With K of 4 or less this is a few passes over contiguous rows, where a grouped
``F.conv1d`` on CPU needs x transposed to channels-first and padded (two copies), a depthwise kernel that is slow
in its backward, and the activation's gradient over the transposed layout. The initial state (the K - 1 inputs
before the first token) adds its taps to the first K - 1 outputs only.

Packed sequences (``cu_seqlens``, batch 1) run as one grouped ``F.conv1d``: every sequence gets its own K - 1
history slots in front of it (its initial state, or zeros), placed with one index copy into a slightly longer
sequence of T + N_seq (K - 1) steps, so that one convolution covers all of them and no tap can reach into the
previous sequence's inputs; the outputs at the history slots are dropped, and each sequence's final state is the
last K - 1 steps of its stretch (reaching into its history when it is shorter than K - 1). No loop over sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from zoo.ops.blocking import row_blocks
from zoo.ops.causal_conv1d.naive import activate, compute_dtype


class _TapSum(torch.autograd.Function):
    """The convolution of whole sequences, channels-last, with the SiLU fused: x (B, T, C) of any strides, weight
    (C, K), bias (C,) or None, h0 (B, K - 1, C) or None (any strides), all in one floating dtype. Tap k reads
    x_{t-s} with s = K - 1 - k, from h0 when t < s. Keeps x, weight, h0 and the pre-activation (with SiLU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, h0, silu: bool):
        B, T, C = x.shape
        K = weight.shape[1]
        a = x * weight[:, K - 1] if bias is None else torch.addcmul(bias, x, weight[:, K - 1])
        for k in range(K - 1):
            s = K - 1 - k
            if s < T:
                a[:, s:].addcmul_(x[:, : T - s], weight[:, k])
            if h0 is not None:
                n = min(s, T)
                a[:, :n].addcmul_(h0[:, K - 1 - s : K - 1 - s + n], weight[:, k])
        ctx.silu = silu
        ctx.save_for_backward(x, weight, h0, a if silu else None)
        return F.silu(a) if silu else a

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, h0, a = ctx.saved_tensors
        B, T, C = x.shape
        K = weight.shape[1]
        need_x, need_w, need_b, need_h0 = ctx.needs_input_grad[:4]
        da = torch.empty_like(dy) if ctx.silu else dy
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros_like(weight) if need_w else None
        db = dy.new_zeros(C) if need_b else None
        # blocks of rows from the last: every pass over a block (the SiLU's gradient, the taps of dx, the products
        # summed for dweight) reads what the previous one left in cache; dx of a block needs da up to K - 1 rows
        # after it, which the later block has written
        for t0, t1 in row_blocks(T, B * C, minimum=K, reverse=True):
            dab = da[:, t0:t1]
            if ctx.silu:
                torch.ops.aten.silu_backward.grad_input(dy[:, t0:t1], a[:, t0:t1], grad_input=dab)
            if need_b:
                db += dab.sum((0, 1))
            if need_w:
                for k in range(K):
                    s = K - 1 - k
                    lo = max(t0, s)
                    if lo < t1:
                        dw[:, k] += (da[:, lo:t1] * x[:, lo - s : t1 - s]).sum((0, 1))
            if need_x:
                dxb = torch.mul(dab, weight[:, K - 1], out=dx[:, t0:t1])
                for k in range(K - 1):
                    s = K - 1 - k
                    hi = min(t1, T - s)
                    if t0 < hi:
                        dxb[:, : hi - t0].addcmul_(da[:, t0 + s : hi + s], weight[:, k])
        if need_w and h0 is not None:
            for k in range(K - 1):
                s = K - 1 - k
                n = min(s, T)
                dw[:, k] += (da[:, :n] * h0[:, K - 1 - s : K - 1 - s + n]).sum((0, 1))
        dh0 = None
        if need_h0:
            dh0 = torch.zeros(B, K - 1, C, dtype=da.dtype, device=da.device)
            for k in range(K - 1):
                s = K - 1 - k
                n = min(s, T)
                dh0[:, K - 1 - s : K - 1 - s + n].addcmul_(da[:, :n], weight[:, k])
        return dx, dw, db, dh0, None


def _packed_layout(cu_seqlens: torch.Tensor, K: int, device: torch.device):
    """Indices into the sequence with history slots: of every token (T,), of every history slot (N_seq * (K - 1),),
    sequence-major, oldest first, and of every sequence's last K - 1 steps (N_seq, K - 1)."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    n_seq = cu.numel() - 1
    T = int(cu[-1])
    seq_of_token = torch.bucketize(torch.arange(T, device=device), cu[1:], right=True)
    tokens = torch.arange(T, device=device) + (seq_of_token + 1) * (K - 1)
    start = cu[:-1] + torch.arange(n_seq, device=device) * (K - 1)  # where each sequence's history begins
    steps = torch.arange(K - 1, device=device)
    history = (start[:, None] + steps).reshape(-1)
    end = cu[1:] + torch.arange(1, n_seq + 1, device=device) * (K - 1)  # one past each sequence's last token
    last = end[:, None] - (K - 1) + steps
    return tokens, history, last, T + n_seq * (K - 1)


def chunk_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The convolution; arguments as ``naive.naive_causal_conv1d``."""
    batch, T, C = x.shape
    K = weight.shape[1]
    if T == 0:  # F.conv1d refuses an input shorter than the filter; nothing to convolve, the state passes on
        rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        final = initial_state if initial_state is not None else x.new_zeros(rows, C, K - 1)
        return x.new_zeros(x.shape), final.to(x.dtype) if output_final_state else None
    acc = compute_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        if cu_seqlens is None:
            h0 = None if initial_state is None else initial_state.to(acc).transpose(1, 2)  # (batch, K - 1, C)
            b = None if bias is None else bias.to(acc)
            y = _TapSum.apply(x.to(acc), weight.to(acc), b, h0, activation is not None)
            final = None
            if output_final_state:  # the last K - 1 inputs, reaching into the initial state when T < K - 1
                if T >= K - 1:
                    final = x[:, T - (K - 1) :].transpose(1, 2).contiguous()
                else:
                    history = initial_state if initial_state is not None else x.new_zeros(batch, C, K - 1)
                    final = torch.cat([history.to(x.dtype), x.transpose(1, 2)], dim=2)[..., T:]
            return y.to(x.dtype), final
        w = weight.to(acc)[:, None, :]  # (C, 1, K): one filter per channel
        b = None if bias is None else bias.to(acc)
        xt = x.to(acc).transpose(1, 2)  # (batch, C, T)
        tokens, history, last, length = _packed_layout(cu_seqlens, K, x.device)
        n_seq = cu_seqlens.numel() - 1
        xs = xt.new_zeros(1, C, length).index_copy(2, tokens, xt)
        if initial_state is not None:
            h0 = initial_state.to(acc).transpose(0, 1).reshape(1, C, n_seq * (K - 1))  # sequence-major
            xs = xs.index_copy(2, history, h0)
        # output j is the window ending at step j + K - 1
        y = activate(F.conv1d(xs, w, b, groups=C).index_select(2, tokens - (K - 1)), activation)
        final = xs[0][:, last].transpose(0, 1) if output_final_state else None  # (N_seq, C, K - 1)
    final = None if final is None else final.to(x.dtype)
    return y.transpose(1, 2).to(x.dtype), final
