r"""The generalised delta rule in chunks, in PyTorch: the CPU fast path and the fallback everywhere.

The recurrence of RWKV-7 (Peng et al. 2025, arXiv:2503.14456; see ``naive.py``), written here with the state
transposed, S (Dk, Dv), and the scale folded into q:

    S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T         D_t = diag(exp(g_t)),  g_t <= 0
    o_t = S_t^T q_t

The sequence is cut into chunks of C tokens. Inside a chunk entering with state S_0, with G_t = g_1 + ... + g_t
the chunk-local cumulative log-decay (G_0 = 0), the transition's rank-one part only reads the state through
u_t = S_{t-1}^T a_t (a row of Dv numbers). Taking the u_t as inputs, the recurrence is diagonal and unrolls to

    S_t = diag(e^{G_t}) S_0 + sum_{i<=t} diag(e^{G_t - G_i}) (k_i v_i^T + b_i u_i^T)                    (1)

and reading (1) at t - 1 through a_t gives the u_t themselves, a lower-triangular system (the UT transform):

    u_t = S_0^T (a_t * e^{G_{t-1}}) + sum_{i<t} Aak_ti v_i + Aab_ti u_i,    Axy_ti = sum_c x_t[c] y_i[c] e^{G_{t-1}[c] - G_i[c]}
    (I - Aab) U = Aak V + Ã S_0      =>      U = W + P S_0,   W = (I - Aab)^{-1} Aak V,   P = (I - Aab)^{-1} Ã

one triangular solve per chunk (C x C, unit diagonal, Dv + Dk right-hand sides), Ã the rows a_t * e^{G_{t-1}}.
This is the WY representation of the chunk's product of transitions: with B̃, K̃ the rows b_i * e^{G_C - G_i},
k_i * e^{G_C - G_i}, the product (D_C + b_C a_C^T) ... (D_1 + b_1 a_1^T) equals diag(e^{G_C}) + B̃^T P, the
diagonal plus a rank-C correction. The outputs and the state leaving the chunk follow from (1):

    O   = Aqk V + Aqb W + (Q̃ + Aqb P) S_0          (Aq. as A.. with G_t for G_{t-1}, i <= t; Q̃ = q_t * e^{G_t})
    S_C = (diag(e^{G_C}) + B̃^T P) S_0 + K̃^T V + B̃^T W  =  M S_0 + H

Everything but S_0 is computed for all chunks at once; the only sequential step is S_{n+1} = M_n S_n + H_n, done
without forming M_n as e^{G_C} * S_n + B̃^T (P S_n) (2 C Dk Dv multiply-adds per chunk rather than Dk^2 (C + Dv)),
after which all outputs are one batched matmul again.

Numerical stability. Every exponent above is G_x - G_y with x later than y, so it is <= 0: no exp overflows, and
one underflows only where the true factor is below float range. The pair matrices Axy cannot be formed as
(x_t e^{G_t}) (y_i e^{-G_i})^T, because e^{-G_i} overflows float32 once a channel has decayed by e^88 inside the
chunk (a few tokens of strong decay). Instead, the strictly lower triangle is filled block by block at log2(C)
levels: at level s the chunk is cut into blocks of 2s tokens, and the pairs (t in the second half, i in the first
half) are one matmul through the reference r, the last token of the first half:

    e^{G_{t-1} - G_i} = e^{G_{t-1} - G_r} e^{G_r - G_i}          both factors <= 1, since i <= r <= t - 1

Every pair i < t falls in exactly one such block, so the triangle is exact, at C * Dk multiply-adds per token in
all (as one dense C x C product). The diagonal of Aq. is q_t . k_t, q_t . b_t. Every exponent is formed as a sum
of the g's between its two tokens (a cumulative sum inside the half block, or from the chunk's end), never as the
difference of two large cumulative sums, so that a large |G| cannot swallow a small difference in float32.

Packed sequences (``cu_seqlens``, batch 1): each sequence is padded to a whole number of chunks (padding tokens
have k = v = a = b = 0 and g = 0, an identity transition), so that no chunk holds two sequences; the chunk scan
restarts from each sequence's own initial state at its first chunk. The backward is autograd's through the batched
operations, and written out for the two loops (the levels of the pair triangles, the scan over chunks), where
autograd would add a node per level or chunk and a zero-filled full-size gradient for every view; it keeps one state
per chunk, not per token.

Chunk length: short chunks are the fastest on a CPU for the usual head sizes (``default_chunk_size``): the work in
the (C, C) blocks grows with C, the scan's only with 1 / C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.ops.delta_rule.naive import state_dtype


def _pair_level(L: torch.Tensor, R: torch.Tensor, g: torch.Tensor, s: int):
    """The decayed row and column vectors of level ``s`` (blocks of 2s tokens, the chunk's C // 2s per chunk).

    For t in the second half of a block and i in its first half, with r the first half's last token,
    e^{G_{t-1} - G_i} = e^{G_{t-1} - G_r} e^{G_r - G_i}, both factors <= 1 (i <= r <= t - 1). Returns rows
    (..., P, s, X, Dk) = L_t * e^{G_{t-1} - G_r} (x = 0, the a rows) or e^{G_t - G_r} (x = 1, the q rows), cols
    (..., P, s, Y, Dk) = R_i * e^{G_r - G_i}, and the two factors. The exponents are sums of g over the tokens in
    between (a cumulative sum inside the half block), never differences of two large cumulative sums.
    """
    *lead, C, X, Dk = L.shape
    Y = R.shape[-2]
    P = C // (2 * s)
    halves = g.view(*lead, P, 2, s, Dk)
    ahead = halves[..., 1, :, :].cumsum(-2)  # G_t - G_r
    ahead_prev = F.pad(ahead[..., :-1, :], (0, 0, 1, 0))  # G_{t-1} - G_r
    behind = halves[..., 0, :, :].flip(-2).cumsum(-2).flip(-2)
    behind = F.pad(behind[..., 1:, :], (0, 0, 0, 1))  # G_r - G_i
    e_rows = torch.stack([ahead_prev, ahead], -2).exp()  # (..., P, s, 2, Dk)
    e_cols = behind.exp().unsqueeze(-2)  # (..., P, s, 1, Dk)
    rows = L.view(*lead, P, 2, s, X, Dk)[..., 1, :, :, :] * e_rows
    cols = R.view(*lead, P, 2, s, Y, Dk)[..., 0, :, :, :] * e_cols
    return rows, cols, e_rows, e_cols


def _corners(M: torch.Tensor, s: int) -> torch.Tensor:
    """The (second half, first half) corners of the 2s x 2s diagonal blocks of M (..., X, Y, C, C), as a strided
    view (..., X, Y, s, s, P)."""
    *lead, X, Y, C, _ = M.shape
    P = C // (2 * s)
    target = M.view(*lead, X, Y, P, 2, s, P, 2, s)[..., 1, :, :, 0, :]  # (..., X, Y, P, s, P, s)
    return torch.diagonal(target, dim1=-4, dim2=-2)


class _PairMatrices(torch.autograd.Function):
    """The strictly lower triangles of the decayed pair products, for every chunk at once.

    L (..., C, 2, Dk): the row vectors (a_t, q_t); R (..., C, Y, Dk): the column vectors (k_i, b_i); g (..., C, Dk)
    the log-decays. Returns M (..., 2, Y, C, C) with, for i < t (else 0),

        M[0, y, t, i] = sum_c a_t[c] R_i[y, c] exp(G_{t-1}[c] - G_i[c])
        M[1, y, t, i] = sum_c q_t[c] R_i[y, c] exp(G_t[c] - G_i[c]),

    filled one level of the halving at a time (``_pair_level``): every pair i < t lies in the corner of exactly
    one diagonal block. The backward is written out level by level (the rows and columns recomputed, not kept):
    through autograd every level's views and pads of the full inputs would each cost a zero-filled gradient of
    the inputs' size.
    """

    @staticmethod
    def forward(ctx, L, R, g):
        with torch.autocast(L.device.type, enabled=False):
            return _PairMatrices._forward(ctx, L, R, g)

    @staticmethod
    def _forward(ctx, L, R, g):
        *lead, C, X, Dk = L.shape
        Y = R.shape[-2]
        n = len(lead)
        M = L.new_zeros(*lead, X, Y, C, C)
        s = C // 2
        while s >= 1:
            P = C // (2 * s)
            rows, cols, _, _ = _pair_level(L, R, g, s)
            block = rows.reshape(*lead, P, s * X, Dk) @ cols.reshape(*lead, P, s * Y, Dk).transpose(-1, -2)
            block = block.view(*lead, P, s, X, s, Y).permute(*range(n), n + 2, n + 4, n + 1, n + 3, n)
            _corners(M, s).copy_(block)  # (..., X, Y, s, s, P)
            s //= 2
        ctx.save_for_backward(L, R, g)
        return M

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dM):
        with torch.autocast(dM.device.type, enabled=False):
            return _PairMatrices._backward(ctx, dM)

    @staticmethod
    def _backward(ctx, dM):
        L, R, g = ctx.saved_tensors
        *lead, C, X, Dk = L.shape
        Y = R.shape[-2]
        n = len(lead)
        dM = dM.contiguous()
        dL, dR, dg = torch.zeros_like(L), torch.zeros_like(R), torch.zeros_like(g)
        s = C // 2
        while s >= 1:
            P = C // (2 * s)
            rows, cols, e_rows, e_cols = _pair_level(L, R, g, s)
            # (..., X, Y, s_t, s_i, P) -> (..., P, s_t X, s_i Y), the layout of the forward's block
            d_block = (
                _corners(dM, s)
                .permute(*range(n), n + 4, n + 2, n, n + 3, n + 1)
                .reshape(*lead, P, s * X, s * Y)
            )
            d_rows = (d_block @ cols.reshape(*lead, P, s * Y, Dk)).view(*lead, P, s, X, Dk)
            d_cols = (d_block.transpose(-1, -2) @ rows.reshape(*lead, P, s * X, Dk)).view(*lead, P, s, Y, Dk)
            dL.view(*lead, P, 2, s, X, Dk)[..., 1, :, :, :].addcmul_(d_rows, e_rows)
            dR.view(*lead, P, 2, s, Y, Dk)[..., 0, :, :, :].addcmul_(d_cols, e_cols)
            # the exponents: rows = L * e^{x} gives d x = d_rows * rows (likewise for the columns)
            d_exp_rows = d_rows * rows  # (..., P, s, 2, Dk): G_{t-1} - G_r (x = 0), G_t - G_r (x = 1)
            d_ahead = d_exp_rows[..., 1, :]
            # G_{t-1} - G_r is the previous token's G_t - G_r
            d_ahead[..., :-1, :] += d_exp_rows[..., 1:, 0, :]
            d_behind = (d_cols * cols).sum(-2)  # (..., P, s, Dk)
            d_halves = dg.view(*lead, P, 2, s, Dk)
            # G_t - G_r sums g over the second half up to t: each g collects the d of every t at or after it;
            # G_r - G_i sums g over the first half after i: each g collects the d of every i before it
            d_halves[..., 1, :, :] += d_ahead.flip(-2).cumsum(-2).flip(-2)
            d_halves[..., 0, 1:, :] += d_behind[..., :-1, :].cumsum(-2)
            s //= 2
        return dL, dR, dg


def _pair_matrices(L: torch.Tensor, R: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``_PairMatrices`` on (L, R, g): M (..., 2, Y, C, C)."""
    return _PairMatrices.apply(L.contiguous(), R.contiguous(), g.contiguous())


def _to_chunks(x: torch.Tensor, layout, C: int, acc) -> torch.Tensor:
    """(B, T, H, D) -> (chunks, rows, C, D) in ``acc``: rows are B * H (or H for packed sequences, B == 1)."""
    B, T, H, D = x.shape
    x = x.to(acc)
    if layout is None:
        N = -(-T // C)
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, N * C - T))  # (B, N C, H, D)
        return x.view(B, N, C, H, D).permute(1, 0, 3, 2, 4).reshape(N, B * H, C, D)
    index, _ = layout
    x = torch.cat([x[0], x.new_zeros(1, H, D)])  # (T + 1, H, D): the last row is padding
    x = x.index_select(0, index)  # (chunks C, H, D)
    return x.view(index.numel() // C, C, H, D).transpose(1, 2)


def _from_chunks(O: torch.Tensor, layout, B: int, T: int, H: int) -> torch.Tensor:
    """(chunks, rows, C, Dv) -> (B, T, H, Dv), inverse of ``_to_chunks``."""
    N, _, C, Dv = O.shape
    if layout is None:
        return O.view(N, B, H, C, Dv).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, Dv)[:, :T]
    _, tokens = layout
    return O.transpose(1, 2).reshape(N * C, H, Dv).index_select(0, tokens)[None]


def _packed_layout(cu_seqlens: torch.Tensor, T: int, C: int):
    """Where each padded chunk position reads from (T: padding), where each token lands, and each sequence's
    chunks (first, end)."""
    bounds = cu_seqlens.tolist()
    index, ranges, first = [], [], 0
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        n = -(-(eos - bos) // C)
        pos = torch.arange(bos, bos + n * C)
        index.append(torch.where(pos < eos, pos, T))
        ranges.append((first, first + n))
        first += n
    index = torch.cat(index).to(cu_seqlens.device)
    tokens = (index < T).nonzero()[:, 0]
    return (index, tokens), ranges


def chunk_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise generalised delta rule. q, k, a, b, g (B, T, H, Dk); v (B, T, H, Dv); states (N, H, Dk, Dv).

    ``chunk_size`` must be a power of 2 (the pair triangles are filled by halving, see the module docstring);
    None: ``default_chunk_size``.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = default_chunk_size(Dk, Dv) if chunk_size is None else chunk_size
    acc = state_dtype(q.dtype)
    if cu_seqlens is None:
        layout, ranges = None, [(0, -(-T // C))]
        rows = B * H
        S0 = None if initial_state is None else initial_state.reshape(1, rows, Dk, Dv)
    else:
        layout, ranges = _packed_layout(cu_seqlens, T, C)
        rows = H
        S0 = initial_state
    S0 = q.new_zeros(len(ranges), rows, Dk, Dv, dtype=acc) if S0 is None else S0.to(acc)

    # 1. chunks: (N, rows, C, D); the scale folded into q. Log-decays from the chunk's start: G through token t,
    # G_prev through t - 1; G_end - G_i, from token i to the chunk's end, summed from the end (not a difference)
    q, k, v, a, b, g = (
        _to_chunks(x, layout, C, acc) for x in (q if scale == 1 else q * scale, k, v, a, b, g)
    )
    G = g.cumsum(-2)
    G_prev = F.pad(G[..., :-1, :], (0, 0, 1, 0))
    to_end = g.flip(-2).cumsum(-2).flip(-2)
    to_end = F.pad(to_end[..., 1:, :], (0, 0, 0, 1)).exp()  # (N, rows, C, Dk), <= 1
    decay_end = G[..., -1, :, None].exp()  # (N, rows, Dk, 1)

    # 2. decayed pair products inside each chunk (strictly lower), plus the diagonal for the q rows
    pairs = _pair_matrices(torch.stack([a, q], -2), torch.stack([k, b], -2), g)  # (N, rows, 2, 2, C, C)
    (A_ak, A_ab), (A_qk, A_qb) = (x.unbind(2) for x in pairs.unbind(2))  # (N, rows, C, C)
    A_qk = A_qk + torch.diag_embed((q * k).sum(-1))
    A_qb = A_qb + torch.diag_embed((q * b).sum(-1))

    # 3. UT transform: (I - A_ab) [W, P] = [A_ak V, a e^{G_{t-1}}]
    rhs = torch.cat([A_ak @ v, a * G_prev.exp()], -1)  # (N, rows, C, Dv + Dk)
    WP = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True)
    W, P = WP[..., :Dv], WP[..., Dv:]

    # 4. what each chunk does to the state entering it: S_out = (diag(e^{G_C}) + B̃^T P) S_in + H_c; its outputs
    # O_intra + Q_in S_in
    k_end, b_end = k * to_end, b * to_end
    H_c = k_end.transpose(-1, -2) @ v + b_end.transpose(-1, -2) @ W  # (N, rows, Dk, Dv)
    O = A_qk @ v + A_qb @ W  # (N, rows, C, Dv)
    Q_in = q * G.exp() + A_qb @ P  # (N, rows, C, Dk)

    # 5. the scan over chunks, restarting at every sequence's first chunk; then every chunk reads its state
    # (in the state dtype: under autocast the batched products above may be in a lower precision)
    scan_inputs = (x.to(acc) for x in (decay_end, b_end, P, H_c))
    states, finals = _ChunkScan.apply(*scan_inputs, S0, ranges)
    O = O + Q_in @ states
    out = _from_chunks(O, layout, B, T, H).to(v.dtype)
    final = None
    if output_final_state:
        final = finals.view(B, H, Dk, Dv) if cu_seqlens is None else finals
    return out, final


class _ChunkScan(torch.autograd.Function):
    """The sequential part: S_{n+1} = e_n * S_n + B_n^T (P_n S_n) + H_n over the chunks of each sequence.

    decay e (N, rows, Dk, 1) = e^{G_C}; B (N, rows, C, Dk) the rows b_i e^{G_C - G_i}; P (N, rows, C, Dk) from the
    UT transform; H (N, rows, Dk, Dv); S0 (sequences, rows, Dk, Dv); ``ranges`` each sequence's chunks (first,
    end). Returns the state entering every chunk (N, rows, Dk, Dv) and each sequence's final state.

    The chunk's transition diag(e) + B^T P (Dk x Dk) is never formed: applied to S as two products through the C
    rows of P it costs 2 C Dk Dv per chunk instead of Dk^2 (C + Dv). The backward runs the scan in reverse,
    written out, so that the loop over chunks adds no autograd node per chunk.
    """

    @staticmethod
    def forward(ctx, decay, B, P, H, S0, ranges):
        with torch.autocast(H.device.type, enabled=False):
            return _ChunkScan._forward(ctx, decay, B, P, H, S0, ranges)

    @staticmethod
    def _forward(ctx, decay, B, P, H, S0, ranges):
        states = torch.empty_like(H)
        finals = torch.empty_like(S0)
        Bt = B.transpose(-1, -2)
        for j, (first, end) in enumerate(ranges):
            S = S0[j]
            for n in range(first, end):
                states[n] = S
                S = torch.baddbmm(H[n], Bt[n], P[n] @ S).addcmul_(decay[n], S)
            finals[j] = S
        ctx.save_for_backward(decay, B, P, states)
        ctx.ranges = ranges
        return states, finals

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_states, d_finals):
        with torch.autocast(d_states.device.type, enabled=False):
            return _ChunkScan._backward(ctx, d_states, d_finals)

    @staticmethod
    def _backward(ctx, d_states, d_finals):
        decay, B, P, states = ctx.saved_tensors
        d_decay, dB, dP = torch.zeros_like(decay), torch.zeros_like(B), torch.zeros_like(P)
        dH, dS0 = torch.zeros_like(states), torch.zeros_like(d_finals)
        Pt = P.transpose(-1, -2)
        for j, (first, end) in enumerate(ctx.ranges):
            dS = d_finals[j]  # the gradient of the state leaving chunk n, going back
            for n in reversed(range(first, end)):
                S = states[n]
                dH[n] = dS
                d_decay[n] = (dS * S).sum(-1, keepdim=True)
                dB[n] = (P[n] @ S) @ dS.transpose(-1, -2)  # d B = (P S) dS^T
                dU = B[n] @ dS  # the gradient of P S
                dP[n] = dU @ S.transpose(-1, -2)
                dS = torch.baddbmm(d_states[n], Pt[n], dU).addcmul_(decay[n], dS)
            dS0[j] = dS
        return d_decay, dB, dP, dH, dS0, None


def default_chunk_size(Dk: int, Dv: int) -> int:
    """The chunk length of the torch form when none is given, from the head sizes.

    Per token and head the chunked form costs about 7 C sqrt(Dk Dv) multiply-adds in its (C, C) blocks and the
    pair triangles (plus elementwise work on them, log2(C) levels), about 4 Dk Dv in the chunk's state products
    whatever C is, and Dk^2 Dv / C in the scan: short chunks win for small heads. The power of 2 at or below
    sqrt(Dk Dv) / 4, between 16 and 64, was the fastest or within 5% of it when measured on a CPU (forward +
    backward, T = 2048, 256 channels in all): 16 for heads of 32 and 64 (1.1-1.4x faster than 64), 32 for 128.
    """
    root = max(Dk * Dv, 1) ** 0.5 / 4
    return int(min(max(2 ** int(math.log2(max(root, 1))), 16), 64))


def check_chunk_size(chunk_size: int, op: str) -> None:
    """``chunk_size`` must be a power of 2 for the torch backend."""
    if chunk_size < 1 or 2 ** int(math.log2(chunk_size)) != chunk_size:
        raise ValueError(f"{op}: chunk_size={chunk_size}, expected a power of 2 (1, 2, 4, ..., 64, ...)")
