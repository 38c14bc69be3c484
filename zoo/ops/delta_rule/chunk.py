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

through the inverse of (I - Aab) (one triangular solve per chunk with C right-hand sides, then two products; a
solve with the Dv + Dk right-hand sides themselves costs more on a CPU), Ã the rows a_t * e^{G_{t-1}}.
This is the WY representation of the chunk's product of transitions: with B̃, K̃ the rows b_i * e^{G_C - G_i},
k_i * e^{G_C - G_i}, the product (D_C + b_C a_C^T) ... (D_1 + b_1 a_1^T) equals diag(e^{G_C}) + B̃^T P, the
diagonal plus a rank-C correction. The outputs and the state leaving the chunk follow from (1):

    O   = Aqk V + Aqb U + Q̃ S_0                    (Aq. as A.. with G_t for G_{t-1}, i <= t; Q̃ = q_t * e^{G_t})
    S_C = diag(e^{G_C}) S_0 + K̃^T V + B̃^T U        =  (diag(e^{G_C}) + B̃^T P) S_0 + K̃^T V + B̃^T W

Everything but S_0 is computed for all chunks at once; the only sequential steps are, per chunk, U = W + P S_n,
its reading Q̃ S_n and S_{n+1} = e^{G_C} * S_n + [K̃; B̃]^T [V; U] (the transition diag(e^{G_C}) + B̃^T P is never
formed: 4 C Dk Dv multiply-adds per chunk rather than Dk^2 (C + Dv)), after which all outputs are one batched matmul
again. The states entering the chunks are kept only when a backward will need them.

Numerical stability. Every exponent above is G_x - G_y with x later than y, so it is <= 0: no exp overflows, and
one underflows only where the true factor is below float range. The pair matrices Axy are formed as
(x_t e^{G_t}) (y_i e^{-G_i})^T, one matmul per chunk, only where every chunk's decay span |G_C| is at most
``MAX_SPAN`` (always for RWKV-7's decays, at most e^{-e^{-1/2}} per token, in chunks up to 64): e^{-G_i} overflows
float32 once a channel has decayed by e^88 inside the chunk (a few tokens of strong decay). Elsewhere, the strictly
lower triangle is filled block by block at log2(C) levels: at level s the chunk is cut into blocks of 2s tokens,
and the pairs (t in the second half, i in the first half) are one matmul through the reference r, the last token
of the first half:

    e^{G_{t-1} - G_i} = e^{G_{t-1} - G_r} e^{G_r - G_i}          both factors <= 1, since i <= r <= t - 1

Every pair i < t falls in exactly one such block, so the triangle is exact, at C * Dk multiply-adds per token in
all (as one dense C x C product). The diagonal of Aq. is q_t . k_t, q_t . b_t. Every exponent is formed as a sum
of the g's between its two tokens (a cumulative sum inside the half block; G_t and G_C - G_t as products of g with
a 0/1 matrix), never as the difference of two large cumulative sums, so that a large |G| cannot swallow a small
difference in float32; in the one-matmul form, both factors come from the same G, whose rounding up to the
earlier token then cancels.

Packed sequences (``cu_seqlens``, batch 1): each sequence is padded to a whole number of chunks (padding tokens
have k = v = a = b = 0 and g = 0, an identity transition), so that no chunk holds two sequences; the chunk scan
restarts from each sequence's own initial state at its first chunk. The backward is autograd's through the batched
operations, and written out for the two loops (the levels of the pair triangles, the scan over chunks), where
autograd would add a node per level or chunk and a zero-filled full-size gradient for every view; it keeps one state
per chunk, not per token.

Without gradients (inference, prefill) a leaner route computes the same quantities (``_forward_only``): the
decayed rows and columns are products of the inputs read in their own layout, written straight into the chunk
layout (no copies of the inputs into chunks), [K̃; B̃] are the columns times e^{G_C}, the scan keeps the state
entering every chunk, and the outputs O = Aqk V + Aqb U + Q̃ S_in are one batched product after it. It applies
where every chunk's decay span is at most ``MAX_SPAN``; elsewhere the general route runs.

Chunk length: short chunks are the fastest on a CPU for the usual head sizes (``default_chunk_size``): the work in
the (C, C) blocks grows with C, the scan's only with 1 / C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.ops.delta_rule.naive import state_dtype

# the largest decay span |G_C| (summed log-decay over a chunk) for which the pair matrices are one matmul of split
# decays: column factors up to e^40 ~ 2e17 leave float32 ample room for the vectors they multiply
MAX_SPAN = 40.0


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


def _split_pairs(rows: torch.Tensor, k: torch.Tensor, b: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """The pair matrices as one matmul per chunk, for chunks whose decay span allows it (see ``_PairMatrices``).

    e^{G_x - G_i} = e^{G_x} e^{-G_i}: the given rows (..., 2 C, Dk), times the columns [k_i; b_i] / e^{G_i}, each
    within e^{span} of its vector. Both factors come from the same cumulative sums G, so that the rounding of
    G up to the earlier token cancels in the product: in float32 the pairs are as accurate as through the
    levels (measured: within 2x of the levelled form, and of the token-by-token recurrence, up to spans of 80).
    Entries above the diagonal (whose products can be large) are set to 0, not multiplied by it.
    """
    *lead, C, Dk = k.shape
    cols = k.new_empty(*lead, 2 * C, Dk)
    torch.div(k, decay, out=cols[..., :C, :])
    torch.div(b, decay, out=cols[..., C:, :])
    A = rows @ cols.transpose(-1, -2)  # (..., 2 C, 2 C)
    t = torch.arange(C, device=k.device)
    at_or_after, after = (t[None, :] >= t[:, None]).repeat(1, 2), (t[None, :] > t[:, None]).repeat(1, 2)
    return A.masked_fill_(torch.cat([at_or_after, after]), 0.0)  # (a rows: i >= t; q rows: i > t)


def _levelled_pairs(L: torch.Tensor, R: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The strictly lower triangles M (..., X, Y, C, C) of the pairs of rows L (..., C, X, Dk) and columns
    R (..., C, Y, Dk), filled one level of the halving at a time (``_pair_level``)."""
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
    return M


def _levelled_pairs_backward(L, R, g, dM):
    """The gradients of L, R and g from that of ``_levelled_pairs``' M (its strictly lower triangles)."""
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
            _corners(dM, s).permute(*range(n), n + 4, n + 2, n, n + 3, n + 1).reshape(*lead, P, s * X, s * Y)
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


class _PairMatrices(torch.autograd.Function):
    """The decayed pair products of every chunk, at once.

    a, q, k, b, g (..., C, Dk); rows (..., 2 C, Dk) = [a_t e^{G_{t-1}}; q_t e^{G_t}] and decay (..., C, Dk) = e^{G_t},
    with G the cumulative sums of g in the chunk: given, not recomputed (their gradient reaches a, q and g through
    their other uses). Returns A (..., 2 C, 2 C) = [[Aak, Aab], [Aqk, Aqb]] with

        Aak[t, i] = sum_c a_t[c] k_i[c] exp(G_{t-1}[c] - G_i[c])    for i < t, else 0 (Aab likewise with b_i)
        Aqk[t, i] = sum_c q_t[c] k_i[c] exp(G_t[c] - G_i[c])        for i <= t, else 0 (Aqb likewise with b_i).

    Where every chunk's decay span |G_C| is at most ``MAX_SPAN`` (always for RWKV-7's decays, at most e^{-e^{-1/2}}
    per token, in chunks up to 64), one matmul per chunk of split decays (``_split_pairs``); else the
    strictly lower triangles are filled one level of the halving at a time (``_levelled_pairs``: every pair i < t
    lies in the corner of exactly one diagonal block), and the diagonal of the q rows added. The backward is
    written out level by level (the rows and columns recomputed, not kept): through autograd every level's views
    and pads of the full inputs would each cost a zero-filled gradient of the inputs' size.
    """

    @staticmethod
    def forward(ctx, a, q, k, b, g, rows, decay):
        with torch.autocast(a.device.type, enabled=False):
            return _PairMatrices._forward(ctx, a, q, k, b, g, rows, decay)

    @staticmethod
    def _forward(ctx, a, q, k, b, g, rows, decay):
        *lead, C, Dk = a.shape
        ctx.save_for_backward(a, q, k, b, g)
        if bool((decay[..., -1, :] >= math.exp(-MAX_SPAN)).all()):
            return _split_pairs(rows, k, b, decay)
        n = len(lead)
        M = _levelled_pairs(torch.stack([a, q], -2), torch.stack([k, b], -2), g)  # (..., X, Y, C, C)
        A = M.permute(*range(n), n, n + 2, n + 1, n + 3).reshape(*lead, 2 * C, 2 * C)
        A[..., C:, :C].diagonal(dim1=-2, dim2=-1).add_((q * k).sum(-1))
        A[..., C:, C:].diagonal(dim1=-2, dim2=-1).add_((q * b).sum(-1))
        return A

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA):
        with torch.autocast(dA.device.type, enabled=False):
            return _PairMatrices._backward(ctx, dA)

    @staticmethod
    def _backward(ctx, dA):
        a, q, k, b, g = ctx.saved_tensors
        *lead, C, Dk = a.shape
        n = len(lead)
        dM = dA.view(*lead, 2, C, 2, C).permute(*range(n), n, n + 2, n + 1, n + 3)  # (..., X, Y, C, C)
        dL, dR, dg = _levelled_pairs_backward(torch.stack([a, q], -2), torch.stack([k, b], -2), g, dM)
        (da, dq), (dk, db) = dL.unbind(-2), dR.unbind(-2)
        # the diagonal of the q rows: q_t . k_t and q_t . b_t
        d_qk = dA[..., C:, :C].diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (..., C, 1)
        d_qb = dA[..., C:, C:].diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        dq = dq + d_qk * k + d_qb * b
        dk = dk + d_qk * q
        db = db + d_qb * q
        return da, dq, dk, db, dg, None, None


def _pair_matrices(a, q, k, b, g, rows, decay) -> torch.Tensor:
    """``_PairMatrices``: A (..., 2 C, 2 C)."""
    return _PairMatrices.apply(*(x.contiguous() for x in (a, q, k, b, g)), rows, decay)


def _decay_sums(C: int, like: torch.Tensor) -> torch.Tensor:
    """(2 C, C) of 0 and 1: times g (..., C, Dk), the log-decays from the chunk's start through each token, G_t,
    and from each token to the chunk's end, G_C - G_t, each a sum of the g's in between (not a difference)."""
    t = torch.arange(C, device=like.device)
    return torch.cat([t[:, None] >= t[None, :], t[:, None] < t[None, :]]).to(like.dtype)


def _stacked(x: torch.Tensor, fx: torch.Tensor, y: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """[x * fx; y * fy] along the tokens, (..., 2 C, D); written in place when no gradient is taken."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, fx, y, fy)):
        return torch.cat([x * fx, y * fy], -2)
    C = x.shape[-2]
    out = x.new_empty(*x.shape[:-2], 2 * C, x.shape[-1])
    torch.mul(x, fx, out=out[..., :C, :])
    torch.mul(y, fy, out=out[..., C:, :])
    return out


def _to_chunks(x: torch.Tensor, layout, C: int, acc) -> torch.Tensor:
    """(B, T, H, D) -> (chunks, rows, C, D) in ``acc``: rows are B * H (or H for packed sequences, B == 1)."""
    B, T, H, D = x.shape
    x = x.to(acc)
    if layout is None:
        N = -(-T // C)
        if N * C != T:
            x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))  # (B, N C, H, D)
        return x.view(B, N, C, H, D).permute(1, 0, 3, 2, 4).reshape(N, B * H, C, D).contiguous()
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


# eager inside a torch.compile'd model (the graph breaks around it): the pair matrices' form is chosen from the
# data (the decay spans), and tracing would unroll the loop over chunks
@torch.compiler.disable
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
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, a, b, g, initial_state)
    )
    if not needs_grad and T > 0:
        with torch.autocast(q.device.type, enabled=False):
            found = _forward_only(
                q, k, v, a, b, g, scale, initial_state, output_final_state, cu_seqlens, C, acc
            )
        if found is not None:
            return found
    if cu_seqlens is None:
        layout, ranges = None, [(0, -(-T // C))]
        rows = B * H
        S0 = None if initial_state is None else initial_state.reshape(1, rows, Dk, Dv)
    else:
        layout, ranges = _packed_layout(cu_seqlens, T, C)
        rows = H
        S0 = initial_state
    S0 = q.new_zeros(len(ranges), rows, Dk, Dv, dtype=acc) if S0 is None else S0.to(acc)

    # 1. chunks: (N, rows, C, D); the scale folded into q. Log-decays G through token t (from the chunk's start)
    # and G_C - G_t (from token t to the chunk's end), both sums of the g's in between
    q, k, v, a, b, g = (
        _to_chunks(x, layout, C, acc) for x in (q if scale == 1 else q * scale, k, v, a, b, g)
    )
    decay, to_end = (_decay_sums(C, g) @ g).exp().split(C, -2)  # e^{G_t}, e^{G_C - G_t}: <= 1
    decay_prev = F.pad(decay[..., :-1, :], (0, 0, 1, 0), value=1.0)  # e^{G_{t-1}}
    decay_end = decay[..., -1, :, None]  # (N, rows, Dk, 1)
    rows = _stacked(a, decay_prev, q, decay)  # (N, rows, 2 C, Dk): [Ã; Q̃], a_t e^{G_{t-1}} and q_t e^{G_t}
    ends = _stacked(k, to_end, b, to_end)  # [K̃; B̃], k_i and b_i e^{G_C - G_i}
    a_dec, q_dec = rows[..., :C, :], rows[..., C:, :]

    # 2. decayed pair products inside each chunk: Aa. strictly lower, Aq. with the diagonal
    A = _pair_matrices(a, q, k, b, g, rows, decay)  # (N, rows, 2 C, 2 C)
    A_ak, A_ab = A[..., :C, :C], A[..., :C, C:]

    # 3. UT transform: W = (I - A_ab)^{-1} A_ak V, P = (I - A_ab)^{-1} Ã, through the inverse (one triangular
    # solve with C right-hand sides rather than Dv + Dk)
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand(A_ab.shape)
    inverse = torch.linalg.solve_triangular(-A_ab, eye, upper=False, unitriangular=True)
    W, P = inverse @ (A_ak @ v), inverse @ a_dec  # (N, rows, C, Dv), (N, rows, C, Dk)

    # 4. the scan over chunks, restarting at every sequence's first chunk: each chunk's u_t = W + P S_in and its
    # reading Q̃ S_in of the state entering it, then S_out = e^{G_C} * S_in + K̃^T V + B̃^T U (in the state dtype:
    # under autocast the batched products above may be in a lower precision)
    scan_inputs = (x.to(acc) for x in (decay_end, ends, v, W, P, q_dec))
    VU, O_in, finals = _ChunkScan.apply(*scan_inputs, S0, ranges)

    # 5. outputs: O = Aqk V + Aqb U + Q̃ S_in
    O = O_in + A[..., C:, :] @ VU  # (N, rows, C, Dv)
    out = _from_chunks(O, layout, B, T, H).to(v.dtype)
    final = None
    if output_final_state:
        final = finals.view(B, H, Dk, Dv) if cu_seqlens is None else finals
    return out, final


def _token_view(x: torch.Tensor, layout, C: int, acc) -> torch.Tensor:
    """(B, T, H, D) -> (B, N, C, H, D) in ``acc``: a view of the tokens in chunks (padded to whole chunks when
    T is not a multiple of C), or for packed sequences the gathered chunks (1, chunks, C, H, D)."""
    B, T, H, D = x.shape
    x = x.to(acc)
    if layout is None:
        N = -(-T // C)
        if N * C != T:
            x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))
        return x.view(B, N, C, H, D)
    index, _ = layout
    x = torch.cat([x[0], x.new_zeros(1, H, D)]).index_select(0, index)  # (chunks C, H, D)
    return x.view(1, index.numel() // C, C, H, D)


def _chunk_buffer(N: int, B: int, H: int, C: int, D: int, like: torch.Tensor):
    """An (N, B H, 2 C, D) buffer in the chunk layout and its two halves seen in the token layout,
    (B, N, C, H, D) each: element-wise products written there change layout on the way."""
    buf = like.new_empty(N, B * H, 2 * C, D)
    tokens = buf.view(N, B, H, 2 * C, D).permute(1, 0, 3, 2, 4)
    return buf, tokens[:, :, :C], tokens[:, :, C:]


def _forward_only(q, k, v, a, b, g, scale, initial_state, output_final_state, cu_seqlens, C, acc):
    """The chunked form when no gradient is taken (inference, prefill), with fewer passes over memory; None where
    a chunk's decay span exceeds ``MAX_SPAN`` (the caller then takes the general route, with the levelled pair
    matrices).

    The same quantities as the general route (module docstring), arranged for a forward alone: the inputs are not
    copied into the chunk layout, the decayed rows [Ã; Q̃] and columns [k; b] e^{-G} are products of the inputs
    read in their own (token) layout, written into chunk-layout buffers; [K̃; B̃] are the columns times e^{G_C}
    (both factors from the same G, as in the pair matrices); the scan keeps the state entering every chunk, and
    the outputs are one batched product after it, O = Aqk V + Aqb U + Q̃ S_in.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if cu_seqlens is None:
        layout, ranges, R = None, [(0, -(-T // C))], B * H
    else:
        layout, ranges = _packed_layout(cu_seqlens, T, C)
        R = H
    if scale != 1:
        q = q * scale
    q5, k5, v5, a5, b5, g5 = (_token_view(x, layout, C, acc) for x in (q, k, v, a, b, g))
    Bv, N = q5.shape[:2]  # Bv: B, or 1 for packed sequences

    # e^{G_t}, G_t the cumulative sum of the g's from the chunk's start (a sum, not a difference)
    decay = g5.cumsum(2).exp_()  # (Bv, N, C, H, Dk)
    decay_end = decay[:, :, -1].permute(1, 0, 2, 3).reshape(N, R, 1, Dk)
    if not bool((decay_end >= math.exp(-MAX_SPAN)).all()):
        return None

    rows, rows_a, rows_q = _chunk_buffer(N, Bv, H, C, Dk, decay)  # [Ã; Q̃]
    rows_a[:, :, 0] = a5[:, :, 0]
    torch.mul(a5[:, :, 1:], decay[:, :, :-1], out=rows_a[:, :, 1:])  # a_t e^{G_{t-1}}
    torch.mul(q5, decay, out=rows_q)  # q_t e^{G_t}
    cols, cols_k, cols_b = _chunk_buffer(N, Bv, H, C, Dk, decay)  # [k; b] e^{-G_i}
    torch.div(k5, decay, out=cols_k)
    torch.div(b5, decay, out=cols_b)
    VU, V_tokens, _ = _chunk_buffer(N, Bv, H, C, Dv, decay)  # [V; U]
    V_tokens.copy_(v5)

    # pair matrices, masked to the (strict) lower triangles; the UT transform
    A = rows @ cols.transpose(-1, -2)  # (N, R, 2 C, 2 C)
    A.masked_fill_(_pair_mask(C, A.device), 0.0)
    ends_t = cols.mul_(decay_end).transpose(-1, -2)  # [K̃; B̃]^T (N, R, Dk, 2 C), in place of the columns
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand(N, R, C, C)
    inverse = torch.linalg.solve_triangular(-A[..., :C, C:], eye, upper=False, unitriangular=True)
    W = inverse @ (A[..., :C, :C] @ VU[..., :C, :])  # (N, R, C, Dv)
    P = inverse @ rows[..., :C, :]  # (N, R, C, Dk)

    # the scan: U_n = W_n + P_n S_n, S_{n+1} = e^{G_C} * S_n + [K̃; B̃]^T [V; U]; sequence j's chunk n enters with
    # the state in slot n + j and leaves with slot n + j + 1
    U = VU[..., C:, :]
    decay_end = decay_end.transpose(-1, -2)  # (N, R, Dk, 1)
    slots = q5.new_empty(N + len(ranges), R, Dk, Dv)
    S0 = None if initial_state is None else initial_state.to(acc).reshape(len(ranges), R, Dk, Dv)
    for j, (first, end) in enumerate(ranges):
        S = slots[first + j]
        if S0 is None:
            S.zero_()
        else:
            S.copy_(S0[j])
        for n in range(first, end):
            torch.baddbmm(W[n], P[n], S, out=U[n])
            nxt = torch.bmm(ends_t[n], VU[n], out=slots[n + j + 1])
            S = nxt.addcmul_(decay_end[n], S)

    # outputs: O = Aqk V + Aqb U + Q̃ S_in
    if len(ranges) == 1:
        S_in = slots[:N]
    else:
        index = torch.cat([torch.arange(first, end) + j for j, (first, end) in enumerate(ranges)])
        S_in = slots.index_select(0, index.to(slots.device))
    O = A[..., C:, :] @ VU  # (N, R, C, Dv)
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    flat(O).baddbmm_(flat(rows[..., C:, :]), flat(S_in))
    out = _from_chunks(O, layout, B, T, H).to(v.dtype)
    final = None
    if output_final_state:
        ends_at = torch.tensor([end + j for j, (_, end) in enumerate(ranges)], device=slots.device)
        final = slots.index_select(0, ends_at)
        final = final.view(B, H, Dk, Dv) if cu_seqlens is None else final
    return out, final


def _pair_mask(C: int, device) -> torch.Tensor:
    """(2 C, 2 C): True above the diagonal of the a rows' blocks and at or above it of the q rows'."""
    t = torch.arange(C, device=device)
    at_or_after, after = (t[None, :] >= t[:, None]).repeat(1, 2), (t[None, :] > t[:, None]).repeat(1, 2)
    return torch.cat([at_or_after, after])


class _ChunkScan(torch.autograd.Function):
    """The sequential part, over the chunks of each sequence, from its initial state S_0:

        U_n = W_n + P_n S_n          O_n = Q_n S_n          S_{n+1} = e_n * S_n + K_n^T V_n + B_n^T U_n

    decay e (N, rows, Dk, 1) = e^{G_C}; KB (N, rows, 2 C, Dk) the rows [K; B] = [k_i; b_i] * e^{G_C - G_i}; V, W
    (N, rows, C, Dv); P (N, rows, C, Dk) from the UT transform; Q (N, rows, C, Dk) the rows q_t e^{G_t}; S0
    (sequences, rows, Dk, Dv); ``ranges`` each sequence's chunks (first, end). Returns [V; U] (N, rows, 2 C, Dv),
    with U the u_t of every chunk, O (N, rows, C, Dv), what every chunk reads from the state entering it, and each
    sequence's final state.

    The chunk's transition diag(e) + B^T P (Dk x Dk) is never formed: through the C rows of U it costs C Dk Dv per
    chunk instead of Dk^2 (C + Dv), and the state leaving a chunk is one product of [K; B]^T with [V; U]. The states
    entering the chunks are kept only for a backward. The backward runs the scan in reverse, written out, so that
    the loop over chunks adds no autograd node per chunk.
    """

    @staticmethod
    def forward(ctx, decay, KB, V, W, P, Q, S0, ranges):
        with torch.autocast(V.device.type, enabled=False):
            return _ChunkScan._forward(ctx, decay, KB, V, W, P, Q, S0, ranges)

    @staticmethod
    def _forward(ctx, decay, KB, V, W, P, Q, S0, ranges):
        N, rows, C, Dv = V.shape
        VU = V.new_empty(N, rows, 2, C, Dv)
        VU[:, :, 0] = V
        VU[:, :, 1] = W
        U = VU[:, :, 1]  # U_n = W_n + P_n S_n, completed in the loop
        VU = VU.view(N, rows, 2 * C, Dv)
        O = torch.empty_like(V)
        KBt = KB.transpose(-1, -2)  # (N, rows, Dk, 2 C)
        keep = any(ctx.needs_input_grad)
        # with a backward, the state entering chunk n of sequence j is at n + j, and its final state at end + j;
        # without, two buffers in turn
        states = S0.new_empty(N + len(ranges) if keep else 2, *S0.shape[1:])
        finals = torch.empty_like(S0)
        for j, (first, end) in enumerate(ranges):
            S = S0[j]
            if keep:
                S = states[first + j].copy_(S)
            for n in range(first, end):
                U[n].baddbmm_(P[n], S)
                torch.bmm(Q[n], S, out=O[n])
                nxt = states[n + j + 1] if keep else states[(n - first) % 2]
                torch.bmm(KBt[n], VU[n], out=nxt).addcmul_(decay[n], S)
                S = nxt
            finals[j] = S
        if keep:
            ctx.save_for_backward(decay, KB, VU, P, Q, states)
            ctx.ranges = ranges
        return VU, O, finals

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dVU, dO, d_finals):
        with torch.autocast(dVU.device.type, enabled=False):
            return _ChunkScan._backward(ctx, dVU, dO, d_finals)

    @staticmethod
    def _backward(ctx, dVU, dO, d_finals):
        decay, KB, VU, P, Q, slots = ctx.saved_tensors
        C = VU.shape[-2] // 2
        dU = dVU[..., C:, :]
        Pt, Qt = P.transpose(-1, -2), Q.transpose(-1, -2)
        d_in = torch.empty_like(slots)  # the gradient of the state entering each chunk, in the slots' order
        dU_all = torch.empty_like(dU)  # the whole gradient of U_n: its own and through S_{n+1}
        dS0 = torch.empty_like(d_finals)
        for j, (first, end) in enumerate(ctx.ranges):
            d_in[end + j] = d_finals[j]
            for n in reversed(range(first, end)):
                d_next = d_in[n + j + 1]
                torch.baddbmm(dU[n], KB[n, :, C:], d_next, out=dU_all[n])
                d_here = torch.bmm(Qt[n], dO[n], out=d_in[n + j])
                d_here.baddbmm_(Pt[n], dU_all[n]).addcmul_(decay[n], d_next)
            dS0[j] = d_in[first + j]
        # every chunk's slot (the state entering it) and its successor's (the state leaving it)
        index = torch.cat([torch.arange(first, end) + j for j, (first, end) in enumerate(ctx.ranges)])
        index = index.to(slots.device)
        states, d_out = slots.index_select(0, index), d_in.index_select(0, index + 1)
        d_decay = (d_out * states).sum(-1, keepdim=True)
        dKB = VU @ d_out.transpose(-1, -2)  # (N, rows, 2 C, Dk): [V; U] dS_{n+1}^T
        dV = torch.baddbmm(dVU[..., :C, :].flatten(0, 1), KB[..., :C, :].flatten(0, 1), d_out.flatten(0, 1))
        dP = dU_all @ states.transpose(-1, -2)
        dQ = dO @ states.transpose(-1, -2)
        return d_decay, dKB, dV.view_as(dO), dU_all, dP, dQ, dS0, None


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
