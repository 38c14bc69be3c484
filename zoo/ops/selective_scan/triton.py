"""The selective scan's forward as a Triton kernel; the backward is the chunked PyTorch one.

Mamba's recurrence (Gu & Dao 2023, arXiv:2312.00752, Algorithm 2; see ``naive.py``), walked token by token as in
the paper's fused kernel: one program owns a block of BD channels of one sequence and holds their (BD, N) states
in registers from the first token to the last,

    h <- exp2(dt A log2(e)) h + (dt x) B        y = sum_n C h

reading x, dt, B and C once and writing y once, so the forward moves no more memory than its inputs and output.
On the way it stores the state entering every chunk of L tokens, which is what the chunked backward of
``chunk.py`` (``scan_backward``) needs to recompute each chunk's states: the backward is that one, the same
gradients as the ``torch`` backend, run by PyTorch on the GPU. dt_bias, softplus, D and the z gate are torch ops
around the scan (``chunk.selective_scan_with``).

Sequences are addressed through ``cu_seqlens`` when packed (batch 1), and as the rows of the batch otherwise. The
state accumulates in float32 (float32 / bfloat16 inputs; float64 inputs are computed in float32 too, and stored
back in float64).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from zoo.ops.selective_scan.chunk import scan_backward, selective_scan_with


@triton.jit
def _selective_scan_fwd_kernel(
    x,  # (T, R, Dc) time first, R rows
    dt,  # (T, R, Dc) discretised step sizes
    A,  # (Dc, N) times log2(e)
    B,  # (T, R, G, N)
    C,  # (T, R, G, N)
    y,  # (T, R, Dc) output
    h0,  # (S, Dc, N) initial states, read if USE_H0
    ht,  # (S, Dc, N) final states, written if STORE_FINAL
    hs,  # (NC, R, Dc, N) the state entering every chunk of L tokens of a row (chunk 0's set by the caller)
    cu_seqlens,  # (S + 1,) sequence boundaries along T, read if PACKED (then R == 1)
    T,
    R,
    Dc,
    N,
    Dg,  # channels per B/C group
    G,
    L,  # chunk length of hs
    BD: tl.constexpr,
    BN: tl.constexpr,
    PACKED: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    i_d, i_s = tl.program_id(0), tl.program_id(1)  # channel block, sequence
    if PACKED:
        row = 0
        bos = tl.load(cu_seqlens + i_s).to(tl.int64)
        eos = tl.load(cu_seqlens + i_s + 1).to(tl.int64)
    else:
        row = i_s
        bos = tl.full([], 0, tl.int64)  # int64 token offsets: T * R * Dc may pass 2^31
        eos = tl.full([], T, tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d = o_d < Dc
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    p_dn = o_d[:, None] * N + o_n[None, :]  # a (BD, BN) block of a (Dc, N) matrix
    p_bc = (o_d // Dg)[:, None] * N + o_n[None, :]  # channel d reads B/C row d // Dg

    b_A = tl.load(A + p_dn, mask=m_dn, other=0.0).to(tl.float32)
    b_h = tl.zeros([BD, BN], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_s * Dc * N + p_dn, mask=m_dn, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        tok = t * R + row  # (t, row) in the (T, R) token grid
        b_x = tl.load(x + tok * Dc + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_dt = tl.load(dt + tok * Dc + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_B = tl.load(B + tok * G * N + p_bc, mask=m_dn, other=0.0).to(tl.float32)
        b_C = tl.load(C + tok * G * N + p_bc, mask=m_dn, other=0.0).to(tl.float32)
        b_h = tl.exp2(b_dt[:, None] * b_A) * b_h + (b_dt * b_x)[:, None] * b_B
        b_y = tl.sum(b_h * b_C, axis=1)
        tl.store(y + tok * Dc + o_d, b_y.to(y.dtype.element_ty), mask=m_d)
        # the state after token t enters chunk (t + 1) / L when t + 1 starts one
        if ((t + 1) % L == 0) & (t + 1 < T):
            p_hs = hs + ((t + 1) // L * R + row) * Dc * N + p_dn
            tl.store(p_hs, b_h.to(hs.dtype.element_ty), mask=m_dn)
    if STORE_FINAL:
        tl.store(ht + i_s * Dc * N + p_dn, b_h.to(ht.dtype.element_ty), mask=m_dn)


class TritonSelectiveScan(torch.autograd.Function):
    """``chunk.SelectiveScan`` with the forward in Triton: same arguments, same saved tensors, same backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, chunk_size, docs, output_final_state):
        T, R, G, Dg = x.shape
        N = A.shape[-1]
        Dc = G * Dg
        L = min(chunk_size, T)
        n_chunks = -(-T // L)
        sequences = R if docs is None else docs.count
        y = torch.empty_like(x)
        states = x.new_zeros(n_chunks, R, G, Dg, N)
        if h0 is not None and docs is None:
            states[0] = h0
        final = x.new_zeros(sequences, G, Dg, N) if output_final_state else None
        # unused pointers (h0, final, cu_seqlens when absent) get any tensor: the kernel never reads them
        cu_seqlens = docs.cu_seqlens if docs is not None else states
        BN = max(triton.next_power_of_2(N), 2)
        # small channel blocks: more programs to fill the GPU, each with a (BD, BN) state of <= 2K floats (untuned)
        BD = max(min(triton.next_power_of_2(Dc), 2048 // BN, 32), 2)
        grid = (triton.cdiv(Dc, BD), sequences)
        _selective_scan_fwd_kernel[grid](
            x, dt, A * math.log2(math.e), B, C, y, states if h0 is None else h0, states if final is None else final,
            states, cu_seqlens,
            T, R, Dc, N, Dg, G, L,
            BD=BD, BN=BN, PACKED=docs is not None, USE_H0=h0 is not None, STORE_FINAL=output_final_state,
            num_warps=2,
        )  # fmt: skip
        ctx.save_for_backward(x, dt, A, B, C, h0, states)
        ctx.chunk_size = L
        ctx.docs = docs
        return y, final

    @staticmethod
    def backward(ctx, dy, d_final):
        return scan_backward(*ctx.saved_tensors, ctx.chunk_size, ctx.docs, dy, d_final)


def triton_selective_scan(*args, chunk_size: int = 64, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan with the Triton forward; arguments as ``naive.naive_selective_scan``, plus the chunk
    length of the states stored for the backward."""
    return selective_scan_with(TritonSelectiveScan, *args, chunk_size=chunk_size, **kwargs)
