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

Everything but S_0 is computed for all chunks at once; the only sequential step is S_{n+1} = M_n S_n + H_n, one
(Dk x Dk)(Dk x Dv) matmul per chunk, after which all outputs are one batched matmul again.

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
restarts from each sequence's own initial state at its first chunk. The backward is autograd's through these
operations; it keeps one state per chunk, not per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.ops.delta_rule.naive import state_dtype


def _pair_matrices(L: torch.Tensor, R: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The strictly lower triangles of the decayed pair products, for every chunk at once.

    L (..., C, 2, Dk): the row vectors a_t and q_t; R (..., C, Y, Dk): the column vectors (k_i, b_i); g (..., C, Dk)
    the log-decays. Returns M (..., 2, Y, C, C) with, for i < t (else 0),

        M[0, y, t, i] = sum_c a_t[c] R_i[y, c] exp(G_{t-1}[c] - G_i[c])
        M[1, y, t, i] = sum_c q_t[c] R_i[y, c] exp(G_t[c] - G_i[c]).

    (Laid out so that every (C, C) matrix of M is contiguous for the matmuls that use it.)
    """
    *lead, C, X, Dk = L.shape
    Y = R.shape[-2]
    M = L.new_zeros(*lead, X, Y, C, C)
    s = C // 2
    while s >= 1:
        P = C // (2 * s)
        halves = g.view(*lead, P, 2, s, Dk)
        # G_t - G_r for t in the second half of each block of 2s (r: the first half's last token), and
        # G_r - G_i for i in the first half: sums of g over the tokens in between, never differences of two large
        # cumulative sums; all <= 0
        ahead = halves[..., 1, :, :].cumsum(-2)  # (..., P, s, Dk)
        ahead_prev = F.pad(ahead[..., :-1, :], (0, 0, 1, 0))  # G_{t-1} - G_r
        behind = halves[..., 0, :, :].flip(-2).cumsum(-2).flip(-2)
        behind = F.pad(behind[..., 1:, :], (0, 0, 0, 1))  # G_r - G_i
        rows = L.view(*lead, P, 2, s, X, Dk)[..., 1, :, :, :] * torch.stack([ahead_prev, ahead], -2).exp()
        cols = R.view(*lead, P, 2, s, Y, Dk)[..., 0, :, :, :] * behind.exp().unsqueeze(-2)
        block = rows.reshape(*lead, P, s * X, Dk) @ cols.reshape(*lead, P, s * Y, Dk).transpose(-1, -2)
        # into the (second half, first half) corner of each 2s x 2s diagonal block of M
        target = M.view(*lead, X, Y, P, 2, s, P, 2, s)[..., 1, :, :, 0, :]  # (..., X, Y, P, s, P, s)
        n = len(lead)
        block = block.view(*lead, P, s, X, s, Y).permute(*range(n), n + 2, n + 4, n + 1, n + 3, n)
        torch.diagonal(target, dim1=-4, dim2=-2).copy_(block)  # (..., X, Y, s, s, P)
        s //= 2
    return M


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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise generalised delta rule. q, k, a, b, g (B, T, H, Dk); v (B, T, H, Dv); states (N, H, Dk, Dv).

    ``chunk_size`` must be a power of 2 (the pair triangles are filled by halving, see the module docstring).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    acc = state_dtype(q.dtype)
    if cu_seqlens is None:
        layout, ranges = None, [(0, -(-T // C))]
        rows = B * H
        S0 = [None if initial_state is None else initial_state.reshape(rows, Dk, Dv).to(acc)]
    else:
        layout, ranges = _packed_layout(cu_seqlens, T, C)
        rows = H
        S0 = [None if initial_state is None else initial_state[n].to(acc) for n in range(len(ranges))]

    # 1. chunks: (N, rows, C, D); the scale folded into q. Log-decays from the chunk's start: G through token t,
    # G_prev through t - 1; G_end - G_i, from token i to the chunk's end, summed from the end (not a difference)
    q, k, v, a, b, g = (_to_chunks(x, layout, C, acc) for x in (q * scale, k, v, a, b, g))
    G = g.cumsum(-2)
    G_prev = F.pad(G[..., :-1, :], (0, 0, 1, 0))
    to_end = g.flip(-2).cumsum(-2).flip(-2)
    to_end = F.pad(to_end[..., 1:, :], (0, 0, 0, 1)).exp()  # (N, rows, C, Dk), <= 1
    decay_end = G[..., -1, :].exp()  # (N, rows, Dk)

    # 2. decayed pair products inside each chunk (strictly lower), plus the diagonal for the q rows
    pairs = _pair_matrices(torch.stack([a, q], -2), torch.stack([k, b], -2), g)  # (N, rows, 2, 2, C, C)
    (A_ak, A_ab), (A_qk, A_qb) = (x.unbind(2) for x in pairs.unbind(2))  # (N, rows, C, C)
    A_qk = A_qk + torch.diag_embed((q * k).sum(-1))
    A_qb = A_qb + torch.diag_embed((q * b).sum(-1))

    # 3. UT transform: (I - A_ab) [W, P] = [A_ak V, a e^{G_{t-1}}]
    rhs = torch.cat([A_ak @ v, a * G_prev.exp()], -1)  # (N, rows, C, Dv + Dk)
    WP = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True)
    W, P = WP[..., :Dv], WP[..., Dv:]

    # 4. what each chunk does to the state entering it: S_out = M S_in + H_c; its outputs O_intra + Q_in S_in
    k_end, b_end = k * to_end, b * to_end
    H_c = k_end.transpose(-1, -2) @ v + b_end.transpose(-1, -2) @ W  # (N, rows, Dk, Dv)
    M = torch.diag_embed(decay_end) + b_end.transpose(-1, -2) @ P  # (N, rows, Dk, Dk)
    O = A_qk @ v + A_qb @ W  # (N, rows, C, Dv)
    Q_in = q * G.exp() + A_qb @ P  # (N, rows, C, Dk)

    # 5. the scan over chunks, restarting at every sequence's first chunk; then every chunk reads its state
    # (unbound once: indexing M[n] per chunk would cost a full-size gradient per chunk in the backward)
    M, H_c = M.unbind(0), H_c.unbind(0)
    states, finals = [], []
    for (first, end), S in zip(ranges, S0):
        if S is None:
            S = q.new_zeros(rows, Dk, Dv)
        for n in range(first, end):
            states.append(S)
            S = torch.baddbmm(H_c[n], M[n], S)
        finals.append(S)
    if states:
        O = O + Q_in @ torch.stack(states)
    out = _from_chunks(O, layout, B, T, H).to(v.dtype)
    final = None
    if output_final_state:
        final = finals[0].view(B, H, Dk, Dv) if cu_seqlens is None else torch.stack(finals)
    return out, final


def check_chunk_size(chunk_size: int, op: str) -> None:
    """``chunk_size`` must be a power of 2 for the torch backend."""
    if chunk_size < 1 or 2 ** int(math.log2(chunk_size)) != chunk_size:
        raise ValueError(f"{op}: chunk_size={chunk_size}, expected a power of 2 (1, 2, 4, ..., 64, ...)")
