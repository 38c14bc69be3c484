"""The long causal convolution as Triton kernels, forward and backward, wrapped in ``torch.autograd.Function``.

Same math as ``naive.py`` (Hyena, Poli et al. 2023, arXiv:2302.10866): per channel, y_t = sum_{j < L} h[j] x_{t-j}.
Blocked: a program owns BT output steps and BC channels of one sequence and walks the BS-step input blocks its
outputs reach (at most L - 1 steps back), gathering the (BT, BS, BC) block of filter taps h[t - s] and reducing
over s. The backward needs two more sums:

    dx_s = sum_{t >= s} h[t - s] dy_t      the same convolution run backwards in time: the forward kernel on the
                                           time-reversed dy, reversed again
    dh_j = sum_n sum_t dy_t x_{t - j}      ``_long_conv_dh_kernel``: a program owns BJ taps and BC channels and
                                           walks every sequence's BT-step blocks from step j on

Everything accumulates in float32 (float64 for float64 inputs). Blocks of 16 steps and 32 channels keep the
gathered (16, 16, 32) block in registers (2 KB of shared memory, no spills on sm_80 / sm_90). The skip term D u, initial states and
packed sequences are laid out around the plain convolution by ``chunk.long_conv`` (``conv_fn``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.ops.long_conv import chunk

BT, BS, BC = 16, 16, 32


@triton.jit
def _long_conv_fwd_kernel(
    x,  # (N, T, C)
    h,  # (L, C) taps, h[0] meets the current step
    y,  # (N, T, C) accumulator dtype
    T,
    L,
    C,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
):
    pid_t, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    x_row = x + n * T * C
    ACC = y.dtype.element_ty  # the accumulator dtype, that of the output
    acc = tl.zeros((BT, BC), dtype=ACC)
    # the first input block any output of this block reaches
    lo = tl.maximum(pid_t * BT - L + 1, 0) // BS * BS
    for s0 in range(lo, (pid_t + 1) * BT, BS):
        s = s0 + tl.arange(0, BS)
        xs = tl.load(x_row + s[:, None] * C + c[None, :], mask=(s[:, None] < T) & c_ok[None, :], other=0.0)
        j = t[:, None] - s[None, :]  # (BT, BS) tap index
        j_ok = (j >= 0) & (j < L)
        taps = tl.load(
            h + j[:, :, None] * C + c[None, None, :], mask=j_ok[:, :, None] & c_ok[None, None, :], other=0.0
        )  # (BT, BS, BC)
        acc += tl.sum(taps.to(ACC) * xs.to(ACC)[None, :, :], axis=1)
    tl.store(y + n * T * C + t[:, None] * C + c[None, :], acc, mask=(t[:, None] < T) & c_ok[None, :])


@triton.jit
def _long_conv_dh_kernel(
    x,  # (N, T, C)
    dy,  # (N, T, C)
    dh,  # (L, C) accumulator dtype
    N,
    T,
    L,
    C,
    BJ: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    pid_j, pid_c = tl.program_id(0), tl.program_id(1)
    j = pid_j * BJ + tl.arange(0, BJ)
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    ACC = dh.dtype.element_ty
    acc = tl.zeros((BJ, BC), dtype=ACC)
    for n in range(N):
        row = n * T * C
        # outputs before step j have no tap j
        for t0 in range(pid_j * BJ // BT * BT, T, BT):
            t = t0 + tl.arange(0, BT)
            g = tl.load(
                dy + row + t[:, None] * C + c[None, :], mask=(t[:, None] < T) & c_ok[None, :], other=0.0
            )
            s = t[None, :] - j[:, None]  # (BJ, BT) input step
            s_ok = (s >= 0) & (s < T)
            xs = tl.load(
                x + row + s[:, :, None] * C + c[None, None, :], mask=s_ok[:, :, None] & c_ok[None, None, :],
                other=0.0,
            )  # fmt: skip
            acc += tl.sum(xs.to(ACC) * g.to(ACC)[None, :, :], axis=1)
    tl.store(dh + j[:, None] * C + c[None, :], acc, mask=(j[:, None] < L) & c_ok[None, :])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv(x: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """x (N, T, C) contiguous, h_t (L, C) contiguous -> (N, T, C) in the accumulator dtype."""
    N, T, C = x.shape
    acc = _acc(x.dtype)
    y = torch.empty(N, T, C, dtype=acc, device=x.device)
    grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), N)
    _long_conv_fwd_kernel[grid](x, h_t, y, T, h_t.shape[0], C, BT=BT, BS=BS, BC=BC)
    return y


class _LongConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h):
        x = x.contiguous()
        h_t = h.t().contiguous()  # (L, C): channels contiguous, as x
        ctx.save_for_backward(x, h_t)
        return _conv(x, h_t).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, h_t = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        N, T, C = x.shape
        L = h_t.shape[0]
        dx = _conv(dy.flip(1).contiguous(), h_t).flip(1).to(x.dtype)
        acc = _acc(x.dtype)
        dh_t = torch.empty(L, C, dtype=acc, device=x.device)
        grid = (triton.cdiv(L, BS), triton.cdiv(C, BC))
        _long_conv_dh_kernel[grid](x, dy, dh_t, N, T, L, C, BJ=BS, BT=BT, BC=BC)
        return dx, dh_t.t().to(h_t.dtype)


def triton_long_conv(u, h, D=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The op with the Triton convolution; arguments and results as ``naive.naive_long_conv``."""
    return chunk.long_conv(u, h, D, initial_state, output_final_state, cu_seqlens, conv_fn=_LongConv.apply)
