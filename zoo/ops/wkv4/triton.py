"""RWKV-4's WKV forward as a Triton kernel; the backward differentiates the chunked PyTorch form.

RWKV (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048, eq. 14 and appendix D;
see ``naive.py``), walked token by token as the paper's own CUDA kernel walks it: one program owns a block of BC
channels of one sequence and holds their (numerator, denominator, max) state in registers from the first token to
the last,

    m = max(max, u + k_t)         wkv_t = (e^{max - m} num + e^{u + k_t - m} v_t) / (e^{max - m} den + e^{u + k_t - m})
    max' = max(max + w, k_t)      num' = e^{max + w - max'} num + e^{k_t - max'} v_t      (den' alike, with 1)

every exponent <= 0, reading k and v once and writing wkv once. The recurrence is elementwise per channel, so there
is nothing for a matmul to do and no chunking to gain in the forward.

Backward: the max-tracking state has no simple reverse recurrence (its max is a piecewise function of the keys and
the decay, and the final state's max receives gradients of its own), so the backward recomputes the chunked
``torch`` form (``chunk.chunk_wkv4``, exponents written out, O(T L C)) on the saved inputs and differentiates it with
autograd: the same gradients as the ``torch`` backend, run by PyTorch on the inputs' device.

Sequences are addressed through ``cu_seqlens`` when packed (batch 1), and as B packed sequences of length T
otherwise. The state is kept in float32 (float64 inputs are computed in float32 too, and the final state returned in
float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.ops.wkv4 import chunk
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
    cu_seqlens,  # (N + 1,) sequence boundaries in the packed token axis
    C: tl.constexpr,
    BC: tl.constexpr,
    USE_H0: tl.constexpr,
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


# channels per program: small blocks, so that a (B * C)-channel batch fills the GPU's multiprocessors (untuned)
BLOCK_CHANNELS = 128


class _WKV4(torch.autograd.Function):
    """w, u (C,); k, v (B, T, C); initial_state (N, 3, C) or None; cu_seqlens (N + 1,) or None (then N = B)."""

    @staticmethod
    def forward(ctx, w, u, k, v, initial_state, cu_seqlens, chunk_size):
        B, T, C = k.shape
        if cu_seqlens is None:  # a regular batch is B packed sequences of length T
            cu = torch.arange(0, B + 1, device=k.device, dtype=torch.int64) * T
        else:
            cu = cu_seqlens.to(device=k.device, dtype=torch.int64)
        N = cu.numel() - 1
        kk, vv = k.reshape(B * T, C).contiguous(), v.reshape(B * T, C).contiguous()
        o = torch.empty_like(vv)
        ht = k.new_empty(N, 3, C, dtype=torch.float32)
        h0 = None if initial_state is None else initial_state.contiguous()
        BC = min(BLOCK_CHANNELS, max(16, triton.next_power_of_2(C)))
        _wkv4_fwd_kernel[(triton.cdiv(C, BC), N)](
            w.contiguous(), u.contiguous(), kk, vv, o, ht if h0 is None else h0, ht, cu.contiguous(),
            C=C, BC=BC, USE_H0=h0 is not None, num_warps=1,
        )  # fmt: skip
        ctx.save_for_backward(w, u, k, v, initial_state, cu_seqlens)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        final = ht.to(state_dtype(k.dtype))
        if h0 is not None:  # an empty sequence passes its initial state on exactly, not rounded to float32
            final = torch.where((cu[1:] == cu[:-1])[:, None, None], h0.to(final.dtype), final)
        return o.view(B, T, C), final

    @staticmethod
    def backward(ctx, dout, dfinal):
        w, u, k, v, h0, cu_seqlens = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        leaves = [
            None if x is None else x.detach().requires_grad_(need) for x, need in zip((w, u, k, v, h0), needs)
        ]
        wanted = [x for x, need in zip(leaves, needs) if x is not None and need]
        grads = [None] * len(wanted)
        pairs = [(y, dy) for y, dy in zip((0, 1), (dout, dfinal)) if dy is not None]
        if wanted and pairs:
            with torch.enable_grad():
                outputs = chunk.chunk_wkv4(*leaves, True, cu_seqlens, chunk_size=ctx.chunk_size)
                grads = torch.autograd.grad(
                    [outputs[i] for i, _ in pairs], wanted, [dy for _, dy in pairs], allow_unused=True
                )
        grads = iter(grads)
        result = []
        for x, need in zip(leaves, needs):
            g = next(grads) if x is not None and need else None
            result.append(torch.zeros_like(x) if g is None and x is not None and need else g)
        return (*result, None, None)


def triton_wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """WKV with the Triton forward. k, v (B, T, C); w, u (C,); states (B, 3, C), or one per packed sequence
    (``cu_seqlens``, B == 1). ``chunk_size`` is the chunk length of the backward's chunked form."""
    out, final = _WKV4.apply(w, u, k, v, initial_state, cu_seqlens, chunk_size)
    return out, (final if output_final_state else None)
