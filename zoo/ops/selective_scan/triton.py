"""The selective scan as Triton kernels, forward and backward, wrapped in ``torch.autograd.Function``.

Mamba's recurrence (Gu & Dao 2023, arXiv:2312.00752, Algorithm 2; see ``naive.py``), walked token by token as in
the paper's fused kernel: one program owns a block of BD channels of one sequence and holds their (BD, N) states
in registers from the first token to the last,

    h <- exp2(dt A log2(e)) h + (dt x) B        y = sum_n C h

reading x, dt, B and C once and writing y once, so the forward moves no more memory than its inputs and output.
On the way it stores the state entering every chunk of L tokens ((T / L) states per row, not T).

The backward (``_selective_scan_bwd_kernel``) walks the chunks from the last to the first, one program per block
of channels (within one B/C group) and sequence. For each chunk it first runs the recurrence again from the state
stored for it (or the sequence's initial state at its first token), writing the chunk's L states to a scratch
slot of its own, then goes back through the chunk carrying the adjoint state dh (the gradient reaching h_t), as
in the backward of ``chunk.py`` (formulas in its docstring):

    dh_t = C_t dy_t + E_{t+1} dh_{t+1}      (dh after the last token: the gradient of the final state)
    dA += dh_t E_t h_{t-1} dt_t             d(dt)_t = sum_n dh_t E_t h_{t-1} A + x_t sum_n dh_t B_t
    dx_t = dt_t sum_n dh_t B_t              dB_t, dC_t: sums over the block's channels of dh_t dt_t x_t, dy_t h_t

and dh before the first token is the initial state's gradient. Memory: the scratch holds L states per program,
so activation memory stays the inputs plus T / L states. dB and dC are written once per block of channels and
summed by torch (no atomics: the result does not depend on scheduling), dA once per sequence. dt_bias, softplus,
D and the z gate are torch ops around the scan (``chunk.selective_scan_with``), differentiated by autograd.

Sequences are addressed through ``cu_seqlens`` when packed (batch 1), and as the rows of the batch otherwise. The
state accumulates in float32 (float32 / bfloat16 inputs; float64 inputs are computed in float32 too, and stored
back in float64).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from zoo.ops.selective_scan.chunk import selective_scan_with


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


@triton.jit
def _selective_scan_bwd_kernel(
    x,  # (T, R, Dc) time first, R rows
    dt,  # (T, R, Dc) discretised step sizes
    A,  # (Dc, N)
    B,  # (T, R, G, N)
    C,  # (T, R, G, N)
    dy,  # (T, R, Dc) the gradient reaching y
    h0,  # (S, Dc, N) initial states, read if USE_H0
    d_final,  # (S, Dc, N) the gradient reaching the final states, read if USE_DFINAL
    hs,  # (NC, R, Dc, N) the state entering every chunk of L tokens of a row, as the forward stored them
    cu_seqlens,  # (S + 1,) sequence boundaries along T, read if PACKED (then R == 1)
    scratch,  # (programs, L, BD, BN) float32: one chunk's states, recomputed
    dx,  # (T, R, Dc) out
    ddt,  # (T, R, Dc) out
    dA,  # (S, Dc, N) out: each sequence's share
    dB,  # (NJ, T, R, G, N) out: each block of channels' share
    dC,  # (NJ, T, R, G, N) out
    dh0,  # (S, Dc, N) out
    T,
    R,
    Dc,
    N,
    Dg,  # channels per B/C group
    G,
    L,  # chunk length of hs
    NJ,  # channel blocks per group
    BD: tl.constexpr,
    BN: tl.constexpr,
    PACKED: tl.constexpr,
    USE_H0: tl.constexpr,
    USE_DFINAL: tl.constexpr,
):
    i_gj, i_s = tl.program_id(0), tl.program_id(1)  # (group, channel block in it), sequence
    i_g, i_j = i_gj // NJ, i_gj % NJ
    if PACKED:
        row = 0
        bos = tl.load(cu_seqlens + i_s).to(tl.int64)
        eos = tl.load(cu_seqlens + i_s + 1).to(tl.int64)
    else:
        row = i_s
        bos = tl.full([], 0, tl.int64)  # int64 token offsets: T * R * Dc may pass 2^31
        eos = tl.full([], T, tl.int64)
    o_j = i_j * BD + tl.arange(0, BD)  # channels of the block within the group
    o_d = i_g * Dg + o_j
    o_n = tl.arange(0, BN)
    m_d = o_j < Dg
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    p_dn = o_d[:, None] * N + o_n[None, :]  # a (BD, BN) block of a (Dc, N) matrix
    p_scratch = scratch + (i_s * tl.num_programs(0) + i_gj).to(tl.int64) * L * BD * BN
    p_slot = p_scratch + tl.arange(0, BD)[:, None] * BN + o_n[None, :]  # the block in scratch slot 0
    p_x, p_dt, p_B = x + o_d, dt + o_d, B + i_g * N + o_n

    b_A = tl.load(A + p_dn, mask=m_dn, other=0.0).to(tl.float32)
    b_h0 = tl.zeros([BD, BN], dtype=tl.float32)
    if USE_H0:
        b_h0 += tl.load(h0 + i_s * Dc * N + p_dn, mask=m_dn, other=0.0).to(tl.float32)
    # the gradient reaching the state after the token being processed (after the last one, to start with)
    b_dh = tl.zeros([BD, BN], dtype=tl.float32)
    if USE_DFINAL:
        b_dh += tl.load(d_final + i_s * Dc * N + p_dn, mask=m_dn, other=0.0).to(tl.float32)
    b_dA = tl.zeros([BD, BN], dtype=tl.float32)
    first_chunk = bos // L
    n_chunks = tl.where(eos > bos, (eos - 1) // L + 1 - first_chunk, 0)
    for i in range(0, n_chunks):
        c = first_chunk + n_chunks - 1 - i  # chunks from the last
        start = tl.maximum(bos, c * L)
        stop = tl.minimum(eos, c * L + L)
        # 1. the chunk's states again, from the state entering it (the sequence's own at its first token)
        b_h = tl.load(hs + (c * R + row) * Dc * N + p_dn, mask=m_dn, other=0.0).to(tl.float32)
        b_h = tl.where(start == bos, b_h0, b_h)
        for t in range(start, stop):
            tok = t * R + row  # (t, row) in the (T, R) token grid
            tl.store(p_slot + (t - start) * BD * BN, b_h)  # the state before token t
            b_x = tl.load(p_x + tok * Dc, mask=m_d, other=0.0).to(tl.float32)
            b_dt = tl.load(p_dt + tok * Dc, mask=m_d, other=0.0).to(tl.float32)
            b_B = tl.load(p_B + tok * G * N, mask=m_n, other=0.0).to(tl.float32)
            b_h = tl.exp(b_dt[:, None] * b_A) * b_h + (b_dt * b_x)[:, None] * b_B[None, :]
        tl.debug_barrier()
        # 2. back through the chunk: dh_t = C_t dy_t + E_{t+1} dh_{t+1}, and the inputs' gradients
        for k in range(0, stop - start):
            t = stop - 1 - k
            tok = t * R + row
            off_d, off_n = tok * Dc, tok * G * N
            b_hp = tl.load(p_slot + (t - start) * BD * BN)  # h_{t-1}
            b_x = tl.load(p_x + off_d, mask=m_d, other=0.0).to(tl.float32)
            b_dt = tl.load(p_dt + off_d, mask=m_d, other=0.0).to(tl.float32)
            b_dy = tl.load(dy + off_d + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_B = tl.load(p_B + off_n, mask=m_n, other=0.0).to(tl.float32)
            b_C = tl.load(C + off_n + i_g * N + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_E = tl.exp(b_dt[:, None] * b_A)
            b_dh += b_dy[:, None] * b_C[None, :]
            p_bc = i_j.to(tl.int64) * T * R * G * N + off_n + i_g * N + o_n  # this block's share of dB / dC
            tl.store(dC + p_bc, tl.sum(b_dy[:, None] * b_h, axis=0).to(dC.dtype.element_ty), mask=m_n)
            # a_t = dt_t A is the log-decay: dL/da_t = dh_t E_t h_{t-1}
            b_da = b_dh * b_E * b_hp
            b_dA += b_da * b_dt[:, None]
            b_dhB = tl.sum(b_dh * b_B[None, :], axis=1)  # dL/d(dt x), per channel
            b_ddt = tl.sum(b_da * b_A, axis=1) + b_dhB * b_x
            tl.store(ddt + off_d + o_d, b_ddt.to(ddt.dtype.element_ty), mask=m_d)
            tl.store(dx + off_d + o_d, (b_dhB * b_dt).to(dx.dtype.element_ty), mask=m_d)
            b_dB = tl.sum(b_dh * (b_dt * b_x)[:, None], axis=0)
            tl.store(dB + p_bc, b_dB.to(dB.dtype.element_ty), mask=m_n)
            b_dh = b_E * b_dh
            b_h = b_hp
        tl.debug_barrier()  # the next chunk overwrites the scratch slots
    tl.store(dA + i_s * Dc * N + p_dn, b_dA.to(dA.dtype.element_ty), mask=m_dn)
    tl.store(dh0 + i_s * Dc * N + p_dn, b_dh.to(dh0.dtype.element_ty), mask=m_dn)


class TritonSelectiveScan(torch.autograd.Function):
    """``chunk.SelectiveScan`` in Triton: same arguments, same saved tensors, the same gradients."""

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
        x, dt, A, B, C, h0, states = ctx.saved_tensors
        docs = ctx.docs
        T, R, G, Dg = x.shape
        N = A.shape[-1]
        Dc = G * Dg
        L = ctx.chunk_size
        sequences = R if docs is None else docs.count
        BN = max(triton.next_power_of_2(N), 2)
        BD = max(min(triton.next_power_of_2(Dg), max(512 // BN, 2), 32), 2)
        NJ = triton.cdiv(Dg, BD)
        grid = (G * NJ, sequences)
        dy = dy.contiguous()
        d_final = None if d_final is None else d_final.contiguous()
        dx, ddt = torch.empty_like(x), torch.empty_like(dt)
        dB, dC = (B.new_empty(NJ, *B.shape) for _ in range(2))
        dA = A.new_empty(sequences, G, Dg, N)
        dh0 = x.new_empty(sequences, G, Dg, N)
        scratch = x.new_empty(sequences * G * NJ, L, BD, BN, dtype=torch.float32)
        cu_seqlens = docs.cu_seqlens if docs is not None else states  # never read when not packed
        _selective_scan_bwd_kernel[grid](
            x, dt, A, B, C, dy, states if h0 is None else h0, states if d_final is None else d_final, states,
            cu_seqlens, scratch, dx, ddt, dA, dB, dC, dh0,
            T, R, Dc, N, Dg, G, L, NJ,
            BD=BD, BN=BN, PACKED=docs is not None, USE_H0=h0 is not None, USE_DFINAL=d_final is not None,
            num_warps=4,
        )  # fmt: skip
        return dx, ddt, dA.sum(0), dB.sum(0), dC.sum(0), dh0 if h0 is not None else None, None, None, None


def triton_selective_scan(*args, chunk_size: int = 64, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan with the Triton kernels; arguments as ``naive.naive_selective_scan``, plus the chunk
    length of the states stored for the backward."""
    return selective_scan_with(TritonSelectiveScan, *args, chunk_size=chunk_size, **kwargs)
