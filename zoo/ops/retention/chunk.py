"""Chunkwise retention in PyTorch: the CPU fast path and the fallback everywhere.

The chunkwise recurrent form of RetNet (Sun et al. 2023, arXiv:2307.08621, section 2.2 "chunkwise recurrent
representation"), with the data-dependent scalar gates of gated linear attention (Yang et al. 2023,
arXiv:2312.06635, section 3). The sequence is cut into chunks of C tokens; inside a chunk the parallel form
runs as dense (C, C) matmuls, and a (Dk, Dv) state per head carries everything earlier from chunk to chunk:

    A       = (Q K^T) * D * scale                     D_ij = exp(b_i - b_j) for i >= j, else 0
    o_chunk = A V  +  scale * (Q * exp(b)) S_in
    S_out   = exp(b_C) S_in + (K * exp(b_C - b))^T V

with b the cumulative log-gate *within* the chunk (b_C its last entry). Every exponent is a difference
b_i - b_j with i >= j, or b_i, or b_C - b_j, so it is <= 0 for gates <= 0: nothing overflows, and a strongly
decaying head underflows harmlessly to 0 instead of producing inf * 0 = nan.

Forward and backward are written out by hand (``ChunkRetention``) rather than left to autograd: the chunk loop
then costs two small in-place ops per chunk instead of a graph node each, every product is one batched matmul
over all chunks and heads at once, and only Q, K, V, the (C, C) score blocks and the states entering each chunk
are kept for the backward. With G_n the gradient reaching the state *after* chunk n (G_{N-1} = dS_final):

    dA  = (dO V^T) * D * scale                  dQ = dA K + scale * (dO S_in^T) * exp(b)
    dK  = dA^T Q + (V G^T) * exp(b_C - b)        dV = A^T dO + (K * exp(b_C - b)) G
    G_{n-1} = exp(b_C) G_n + scale * (Q * exp(b))^T dO        (a reverse loop over chunks; dS_0 = G_{-1})

and the gradient of the log-gates from the identity of gated linear attention: with global cumulative gates B,
o_i depends on B_i only through q_i e^{B_i} and on B_j through k_j e^{-B_j}, so dL/dB_i = q_i . dq_i - k_i . dk_i
(plus <dS_T, S_T> at the last token), and dL/dg_t = sum_{i >= t} dL/dB_i.

Layout: chunk-major (N, B*H, C, D), so that the state of chunk n is one contiguous block. A fixed per-head decay
(an [H] decay broadcast over batch and time) shares one (C, C) decay block across all chunks. Memory is
O(T * C + T / C * Dk * Dv): linear in T. The per-chunk states are kept for the backward only while they are no
larger than q, k and v (``keep_chunk_states``); otherwise the backward recomputes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.ops.retention.naive import per_sequence, state_dtype


def _to_chunks(x: torch.Tensor, N: int, C: int, acc: torch.dtype) -> torch.Tensor:
    """(B, T, H, D) -> (N, B*H, C, D), contiguous, in ``acc``; the tail past T is zero."""
    B, T, H, D = x.shape
    if N * C != T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))
    out = torch.empty(N, B, H, C, D, dtype=acc, device=x.device)
    out.copy_(x.reshape(B, N, C, H, D).permute(1, 0, 3, 2, 4))
    return out.view(N, B * H, C, D)


def _from_chunks(x: torch.Tensor, B: int, T: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, B*H, C, D) -> (B, T, H, D) in ``dtype`` (a view of the first T positions when the tail was padded)."""
    N, _, C, D = x.shape
    out = torch.empty(B, N * C, H, D, dtype=dtype, device=x.device)
    out.view(B, N, C, H, D).copy_(x.view(N, B, H, C, D).permute(1, 0, 3, 2, 4))
    return out[:, :T] if N * C != T else out


def _cumulative_gates(g: torch.Tensor, N: int, C: int, acc: torch.dtype) -> torch.Tensor:
    """Log-decay from each chunk's start, inclusive: (N, B*H, C), or (1, B*H, C) for a fixed per-head decay."""
    B, T, H = g.shape
    if g.stride(0) == 0 and g.stride(1) == 0 and N * C == T:
        # one log-gamma per head, broadcast over batch and time: every chunk has the same cumulative decay
        steps = torch.arange(1, C + 1, dtype=acc, device=g.device)
        return (g[0, 0].to(acc)[:, None] * steps).repeat(B, 1)[None]  # (1, B*H, C)
    # padded positions get g = 0: they do not decay the state, so the final state is the one at T
    gp = F.pad(g.to(acc), (0, 0, 0, N * C - T))
    return gp.view(B, N, C, H).permute(1, 0, 3, 2).reshape(N, B * H, C).cumsum(-1)


class _Decays:
    """The decay factors of one call, derived from the cumulative gates b; recomputed in the backward."""

    def __init__(self, b: torch.Tensor, scale: float):
        C = b.shape[-1]
        b_last = b[..., -1:]
        causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
        self.mask = torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")).exp_().mul_(scale)
        self.q = b.exp().mul_(scale)[..., None]  # (n, BH, C, 1): scale * decay from chunk start to i
        self.k = (b_last - b).exp_()[..., None]  # (n, BH, C, 1): decay from j to chunk end
        self.chunk = b_last.exp()[..., None]  # (n, BH, 1, 1): decay across the whole chunk


def _at(x: torch.Tensor, n: int) -> torch.Tensor:
    """Chunk n of a per-chunk factor, or the factor itself when all chunks share it."""
    return x[n] if x.shape[0] > 1 else x[0]


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Chunks start..stop-1 of a per-chunk factor, or the factor itself when all chunks share it."""
    return x[start:stop] if x.shape[0] > 1 else x


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul over the two leading dims of 4-d tensors."""
    return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).view(*a.shape[:2], a.shape[2], b.shape[3])


def _baddbmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out.flatten(0, 1).baddbmm_(a.flatten(0, 1), b.flatten(0, 1))
    return out


def keep_chunk_states(Dk: int, Dv: int, chunk_size: int) -> bool:
    """Whether the backward reuses the forward's per-chunk states (True) or recomputes them (False): kept when
    they take no more memory per token than q, k and v."""
    return Dk * Dv <= chunk_size * (2 * Dk + Dv)


def _chunk_states(K_end: torch.Tensor, V: torch.Tensor, d: _Decays, S0: torch.Tensor | None) -> torch.Tensor:
    """The state after each chunk, (N, BH, Dk, Dv): each chunk's own update K_end^T V, scanned in place,
    S[n] = exp(b_C) S[n - 1] + U[n], with S[-1] the initial state ``S0`` (or zero)."""
    S = _bmm(K_end.transpose(-1, -2), V)
    if S0 is not None:
        S[0].addcmul_(S0, _at(d.chunk, 0))
    for n in range(1, S.shape[0]):
        S[n].addcmul_(S[n - 1], _at(d.chunk, n))
    return S


class ChunkRetention(torch.autograd.Function):
    """Chunkwise retention with a hand-written backward (formulas in the module docstring)."""

    @staticmethod
    def forward(
        ctx, q, k, v, g, initial_state, scale: float, chunk_size: int, output_final_state: bool, row_sum
    ):
        # everything runs in the accumulation dtype, whatever autocast would pick for the matmuls
        with torch.autocast(q.device.type, enabled=False):
            args = (q, k, v, g, initial_state, scale, chunk_size, output_final_state, row_sum)
            return ChunkRetention._forward(ctx, *args)

    @staticmethod
    def _forward(ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state, row_sum):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        key_sum0 = None
        if row_sum and initial_state is not None:  # the last column is the decayed key sum
            initial_state, key_sum0 = initial_state[..., :Dv], initial_state[..., Dv]
        C = chunk_size
        N = -(-T // C)
        acc = state_dtype(q.dtype)
        Q, K, V = (_to_chunks(x, N, C, acc) for x in (q, k, v))  # (N, BH, C, D)
        b = _cumulative_gates(g, N, C, acc)
        d = _Decays(b, scale)

        A = _bmm(Q, K.transpose(-1, -2)).mul_(d.mask)  # (N, BH, C, C)
        K_end = K * d.k
        S0 = None if initial_state is None else initial_state.reshape(B * H, Dk, Dv).to(acc)
        S_out = _chunk_states(K_end, V, d, S0)

        Q_start = Q * d.q
        O = _bmm(A, V)  # (N, BH, C, Dv); chunk n > 0 reads the state S_out[n - 1] left by chunk n - 1
        _baddbmm_(O[1:], Q_start[1:], S_out[:-1])
        if S0 is not None:
            O[0].baddbmm_(Q_start[0], S0)
        # The states cost Dk * Dv / C numbers per token and head. They are kept for the backward when that is no
        # more than q, k and v cost (2 Dk + Dv); beyond (large heads, small chunks: Dk = 256, Dv = 512, C = 64
        # would be 2048 against 1024) the backward recomputes them, one more matmul and scan, so that memory
        # stays a small multiple of the inputs'.
        ctx.kept_states = keep_chunk_states(Dk, Dv, C)
        ctx.save_for_backward(Q, K, V, A, b, S0, S_out if ctx.kept_states else None)
        ctx.meta = (B, T, H, scale, q.dtype, k.dtype, v.dtype, Dv)
        ctx.row_sum = row_sum
        out = _from_chunks(O, B, T, H, v.dtype)
        # a copy: a view would keep every chunk's state alive for as long as the caller keeps the final one
        final = S_out[N - 1].view(B, H, Dk, Dv).clone() if output_final_state else None
        if not row_sum:
            return out, final, None
        # the output for a value of ones, from the same score blocks: intra-chunk row sums of A, plus q against
        # the decayed key sum z entering the chunk (z follows the state's recurrence with v = 1)
        z_in = K.new_empty(N, B * H, Dk, 1)  # small: a plain loop
        z_in[0] = 0 if key_sum0 is None else key_sum0.reshape(B * H, Dk, 1)
        z_chunk = K_end.sum(2)[..., None]  # (N, BH, Dk, 1)
        for n in range(N - 1):
            torch.addcmul(z_chunk[n], _at(d.chunk, n), z_in[n], out=z_in[n + 1])
        sums = _baddbmm_(A.sum(-1, keepdim=True), Q_start, z_in)  # (N, BH, C, 1)
        sums = _from_chunks(sums, B, T, H, v.dtype)[..., 0]  # (B, T, H)
        if output_final_state:
            z_final = torch.addcmul(z_chunk[N - 1], _at(d.chunk, N - 1), z_in[N - 1]).view(B, H, Dk, 1)
            final = torch.cat([final, z_final], dim=-1)
        ctx.mark_non_differentiable(sums)
        return out, final, sums

    @staticmethod
    def backward(ctx, d_out, d_final, _d_sums):
        with torch.autocast(d_out.device.type, enabled=False):
            return ChunkRetention._backward(ctx, d_out, d_final)

    @staticmethod
    def _backward(ctx, d_out, d_final):
        Q, K, V, A, b, S0, S_out = ctx.saved_tensors
        B, T, H, scale, q_dtype, k_dtype, v_dtype, Dv = ctx.meta
        N, BH, C, Dk = Q.shape
        d = _Decays(b, scale)
        K_end = K * d.k
        if S_out is None:
            S_out = _chunk_states(K_end, V, d, S0)
        dO = _to_chunks(d_out, N, C, Q.dtype)
        dS = (
            None if d_final is None else d_final[..., :Dv].reshape(BH, Dk, Dv).to(Q.dtype)
        )  # key sums: no grad

        # gradients of the state entering each chunk, scanned in place from the end:
        # Gin[n] = P[n] + exp(b_C of chunk n) Gin[n + 1], Gin[N] = dS_final; P[n] = chunk n's direct use
        Q_start = Q * d.q
        Gin = _bmm(Q_start.transpose(-1, -2), dO)  # (N, BH, Dk, Dv)
        del Q_start
        if dS is not None:
            Gin[N - 1].addcmul_(dS, _at(d.chunk, N - 1))
        for n in range(N - 2, -1, -1):
            Gin[n].addcmul_(Gin[n + 1], _at(d.chunk, n))
        # the gradient reaching the state *after* chunk n is Gin[n + 1] (dS_final after the last one)

        dA = _bmm(dO, V.transpose(-1, -2)).mul_(d.mask)
        dQ = _bmm(dA, K)
        dK = _bmm(dA.transpose(-1, -2), Q)
        del dA
        dV = _bmm(A.transpose(-1, -2), dO)
        if N > 1:
            rest_q, head_k = _rows(d.q, 1, N), _rows(d.k, 0, N - 1)
            dQ[1:].addcmul_(_bmm(dO[1:], S_out[:-1].transpose(-1, -2)), rest_q)
            dK[:-1].addcmul_(_bmm(V[:-1], Gin[1:].transpose(-1, -2)), head_k)
            _baddbmm_(dV[:-1], K_end[:-1], Gin[1:])
        if S0 is not None:
            dQ[0].addcmul_(torch.bmm(dO[0], S0.transpose(-1, -2)), _at(d.q, 0))
        if dS is not None:
            dK[N - 1].addcmul_(torch.bmm(V[N - 1], dS.transpose(-1, -2)), _at(d.k, N - 1))
            dV[N - 1].baddbmm_(K_end[N - 1], dS)
        del K_end
        d_initial = Gin[0] if S0 is not None else None

        dg = None
        if ctx.needs_input_grad[3]:
            db = (Q * dQ).sum(-1).sub_((K * dK).sum(-1))  # (N, BH, C): dL/dB_i
            if dS is not None:
                db[-1, :, -1] += (dS * S_out[N - 1]).sum((-1, -2))
            db = db.view(N, B, H, C).permute(1, 0, 3, 2).reshape(B, N * C, H)
            dg = db.flip(1).cumsum(1).flip(1)[:, :T]  # dL/dg_t = sum over i >= t

        if d_initial is not None:
            d_initial = d_initial.view(B, H, Dk, Dv)
            if ctx.row_sum:
                d_initial = F.pad(d_initial, (0, 1))
        return (
            _from_chunks(dQ, B, T, H, q_dtype),
            _from_chunks(dK, B, T, H, k_dtype),
            _from_chunks(dV, B, T, H, v_dtype),
            dg,
            d_initial,
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable
def _apply(*args):
    """The op runs eagerly inside a ``torch.compile``d model (the graph breaks around it): tracing it would unroll
    its loops over chunks, which takes minutes to compile at long T and runs slower than the eager op."""
    return ChunkRetention.apply(*args)


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    row_sum: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Chunkwise retention. q, k (B, T, H, Dk); v (B, T, H, Dv); g (B, T, H) log-gates; state (B, H, Dk, Dv).

    With ``row_sum``, also returns the row sums (B, T, H) without gradient, from the same score blocks, and
    the state has one more column (the decayed key sum): (out, state, row_sums). Packed sequences
    (``cu_seqlens``) are run one sequence at a time.
    """
    if cu_seqlens is not None:
        args = (q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
        return per_sequence(chunk_retention, *args, chunk_size=chunk_size, row_sum=row_sum)
    if q.shape[1] == 0:
        B, _, H, Dk = q.shape
        out = v.new_zeros(v.shape)
        state = None
        if output_final_state:
            acc = state_dtype(q.dtype)
            Dv = v.shape[-1] + int(row_sum)
            state = q.new_zeros(B, H, Dk, Dv, dtype=acc) if initial_state is None else initial_state.to(acc)
        return (out, state, q.new_zeros(B, 0, H, dtype=v.dtype)) if row_sum else (out, state)
    out, state, sums = _apply(q, k, v, g, initial_state, scale, chunk_size, output_final_state, row_sum)
    return (out, state, sums) if row_sum else (out, state)
