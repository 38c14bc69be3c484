"""Chunkwise retention for grouped q and k, with the state products run group-wide: the CPU path of Mamba-2's SSD.

Mamba-2's state-space duality (Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060) is retention with
per-token log-gates (RetNet, Sun et al. 2023, arXiv:2307.08621; gated linear attention, Yang et al. 2023,
arXiv:2312.06635) whose q = C and k = B are shared by the R = H / G heads of a group. Its heads are small (Dk = N
states, Dv = P channels, often 16 or 64) and many, so the per-head (C, C) and (Dk, Dv) products of ``chunk.py`` are
thousands of tiny matrices. Here every product in which one factor is shared by a group runs once per group and
chunk on the group's R heads side by side, a (C, Dk) or (Dk, C) factor against a (C, R Dv) or (Dk, R Dv) one, in
the time-major layout [B, T, H, Dv] the caller already has (chunk-major (N, B, G, C, R Dv); a view when B = G = 1):
each head's decay goes on the per-head factor instead of on the shared one. With b the cumulative log-gate within a
chunk (b_C its last entry), w_q = scale exp(b), w_k = exp(b_C - b), per head and token:

    A_h     = (Q K^T) * D_h                         D_h,ij = scale exp(b_i - b_j) for i >= j, else 0   (per head)
    O       = A_h V_h  +  (Q S_in) * w_q             Q S_in: (C, Dk) @ (Dk, R Dv), one product per group
    S_out   = exp(b_C) S_in + K^T (V * w_k)          (Dk, C) @ (C, R Dv)

A_h V_h is per head as written, but its mask factors: with r = b_C / 2 per chunk and head, exp(b_i - b_j) =
exp(b_i - r) exp(r - b_j), so A_h V_h = scale exp(b - r) * (tril(Q K^T) (V_h exp(r - b))), and one (C, C) score block
per group multiplies the (C, R Dv) factor of all its heads side by side (``_Intra``): no per-head (C, C) masks or
products at all. The factors lie within exp(+-|b_C| / 2); a (chunk, head) pair whose decay b_C is below the float
range's share (``FACTORED_RANGE_SHARE``: -80 in float32) is done exactly with its mask, on its own. Backward, with
G_n the gradient of the state entering chunk n (G_N = dS_final):

    dA_h = (dO_h V_h^T) * D_h                 factored: tril((dO exp(b - r)) (V exp(r - b))^T) summed over the heads
    dQ   = (sum_h dA_h) K   + (dO * w_q) S_in^T
    dK   = (sum_h dA_h)^T Q + (V * w_k) G_{n+1}^T
    dV_h = A_h^T dO_h       + (K G_{n+1}) * w_k
    G_n  = exp(b_C) G_{n+1} + Q^T (dO * w_q)

where (dO * w_q) S_in^T and (V * w_k) G_{n+1}^T, (C, R Dv) @ (R Dv, Dk), sum a group's heads inside the product.
The log-gates' gradient
needs, per head, q_i . dq_i - k_i . dk_i (see ``chunk.py``); the outputs and final state are linear in q_i and
bilinear in (k_j, v_j) jointly, so q_i . dq_i = dO_i . o_i and k_j . dk_j = v_j . dv_j for each head: two dot
products over Dv of tensors the backward has anyway, with no per-head dQ or dK.

Mamba-2's time steps and skip come in whole (``v_scale`` s, ``skip`` D): the values are s * x, but x is what the op
reads, s multiplying the per-token factors w_k and exp(r - b) instead (no (B, T, H, Dv) product is formed), and
D x is added to the output in the same pass over the chunk. Their gradients come from the backward's own tensors:
ds = dv . x, dD = sum dO . x, dx = s dv + D dO, and the gates' o_i . dO_i uses the output without the skip.

Forward and backward run through the chunks a segment at a time (``_segments``: about 2^18 numbers per per-head
block, 512 tokens for 32 heads of 16 x 16), so that a segment's intermediates are still in cache when the next
product reads them (the backward from the last segment, carrying the states' gradient); on a CPU this measured
about 1.2x faster than whole-sequence passes. The output is kept for the gates' gradient; the per-chunk states are
kept on the same condition as in ``chunk.py`` (``keep_chunk_states``). Packed documents and row sums go through
``chunk.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.ops.retention import chunk
from zoo.ops.retention.naive import state_dtype

# numbers in each per-head block of a segment of chunks (``_segments``): 2^18, 1 MiB in float32
SEGMENT_ELEMENTS = 1 << 18


class _Layout:
    """Shapes of one call and the moves between [B, T, X, D] and chunk-major (N * B * X, C, D)."""

    def __init__(self, B: int, T: int, G: int, R: int, C: int):
        self.B, self.T, self.G, self.R, self.C = B, T, G, R, C
        self.N = -(-T // C)
        self.Tp = self.N * C

    def chunks(self, x: torch.Tensor, X: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, T, X, D) -> (N * B * X, C, D) in ``dtype``, its rows contiguous: a view when B = X = 1, T fills the
        chunks and x's rows are contiguous (such as a slice of a wider projection), else a contiguous copy."""
        B, N, C = self.B, self.N, self.C
        if self.Tp != self.T:
            x = F.pad(x, (0, 0, 0, 0, 0, self.Tp - self.T))
        D = x.shape[-1]
        x = x.to(dtype).reshape(B, N, C, X, D).permute(1, 0, 3, 2, 4)
        x = x.reshape(N * B * X, C, D)
        return x if x.stride(-1) == 1 else x.contiguous()

    def per_token(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, T, H) -> (N, B, C, H) in ``dtype``, zero past T."""
        if self.Tp != self.T:
            x = F.pad(x, (0, 0, 0, self.Tp - self.T))
        return x.to(dtype).reshape(self.B, self.N, self.C, -1).transpose(0, 1)

    def wide(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token, per-head (N, B, C, H) tensor as a factor (N B G, C, R, 1) of the wide tensors."""
        N, B, C, G, R = self.N, self.B, self.C, self.G, self.R
        return x.reshape(N, B, C, G, R).transpose(2, 3).reshape(N * B * G, C, R, 1)

    def unwide(self, x: torch.Tensor) -> torch.Tensor:
        """(N B G, C, R) per head and token -> (B, T, H)."""
        N, B, C, G, R = self.N, self.B, self.C, self.G, self.R
        return x.view(N, B, G, C, R).permute(1, 0, 3, 2, 4).reshape(B, self.Tp, G * R)[:, : self.T]

    def unchunk(self, x: torch.Tensor, X: int, dtype: torch.dtype) -> torch.Tensor:
        """(N * B * X, C, D) -> (B, T, X, D) in ``dtype``."""
        B, N, C = self.B, self.N, self.C
        D = x.shape[-1]
        x = x.view(N, B, X, C, D).permute(1, 0, 3, 2, 4).reshape(B, self.Tp, X, D)
        return x[:, : self.T].to(dtype)


class _Gates:
    """The decay factors of one call from per-token log-gates g (B, T, H); recomputed only in part for the
    backward (the masks are kept)."""

    def __init__(self, g: torch.Tensor, lay: _Layout, acc: torch.dtype):
        B, N, C, G, R = lay.B, lay.N, lay.C, lay.G, lay.R
        H = G * R
        gp = g.to(acc)
        if lay.Tp != lay.T:  # padded positions do not decay the state: the final state is the one at T
            gp = F.pad(gp, (0, 0, 0, lay.Tp - lay.T))
        # (N, B, C, H): cumulative log-gate from each chunk's start, inclusive
        self.b = gp.reshape(B, N, C, H).transpose(0, 1).cumsum(2).contiguous()
        self.factors(lay)

    @classmethod
    def from_cumulative(cls, b: torch.Tensor, lay: _Layout) -> _Gates:
        gates = cls.__new__(cls)
        gates.b = b
        gates.factors(lay)
        return gates

    def factors(self, lay: _Layout) -> None:
        N, B, C, G, R = lay.N, lay.B, lay.C, lay.G, lay.R
        b_last = self.b[:, :, -1:]
        # per head and token, as factors of the wide (N * B * G, C, R, 1) tensors
        self.q_raw = self.b.exp()  # scale is applied where used
        self.k = (b_last - self.b).exp_().reshape(N, B, C, G, R).transpose(2, 3).reshape(N * B * G, C, R, 1)
        self.chunk = b_last.exp().reshape(N, B * G, 1, R, 1)  # decay across the whole chunk, per head

    def q(self, scale: float, lay: _Layout) -> torch.Tensor:
        N, B, C, G, R = lay.N, lay.B, lay.C, lay.G, lay.R
        return (self.q_raw * scale).reshape(N, B, C, G, R).transpose(2, 3).reshape(N * B * G, C, R, 1)


def _segments(lay: _Layout, H: int, Dv: int) -> list[tuple[int, int]]:
    """Ranges [n0, n1) of chunks that the op runs through at a time: about ``SEGMENT_ELEMENTS`` numbers in each of a
    segment's per-head blocks, so that its intermediates stay in cache between the products that use them."""
    per_chunk = lay.B * H * lay.C * max(lay.C, Dv)
    L = max(1, SEGMENT_ELEMENTS // per_chunk)
    return [(n0, min(n0 + L, lay.N)) for n0 in range(0, lay.N, L)]


def _times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Wide x (n, C, R Dv) times a per-head, per-token factor w (n, C, R, 1)."""
    n, C, RDv = x.shape
    return (x.view(n, C, w.shape[2], -1) * w).view(n, C, RDv)


def _initial_states(S0: torch.Tensor, initial_state: torch.Tensor | None, lay: _Layout) -> None:
    """S0 (B G, Dk, R Dv) = the initial state (B, H, Dk, Dv), or 0."""
    if initial_state is None:
        S0.zero_()
        return
    B, G, R = lay.B, lay.G, lay.R
    Dk, Dv = initial_state.shape[-2:]
    S0.view(B, G, Dk, R, Dv).copy_(initial_state.view(B, G, R, Dk, Dv).transpose(2, 3))


class _Scan:
    """The chunks' states S (N + 1, B G, Dk, R Dv), S[n] entering chunk n, and their decays exp(b_C), per chunk as
    (B G, Dk, R, Dv) views for the sequential scans."""

    def __init__(self, S: torch.Tensor, gates: _Gates):
        N1, BG, Dk, RDv = S.shape
        R = gates.chunk.shape[3]
        self.S, self.chunks = S, S.view(N1, BG, Dk, R, RDv // R).unbind(0)
        self.decay = gates.chunk.unbind(0)

    def forward_(self, K: torch.Tensor, Vk: torch.Tensor, n0: int, n1: int) -> None:
        """S[n + 1] = exp(b_C) S[n] + K_n^T (V_n * w_k) for the chunks n0 <= n < n1 (K, Vk those chunks' rows):
        each chunk's own update in one product per group, then the scan, in place."""
        Dk, RDv = self.S.shape[2:]
        torch.bmm(K.transpose(1, 2), Vk, out=self.S[n0 + 1 : n1 + 1].view(-1, Dk, RDv))
        S, decay = self.chunks, self.decay
        for n in range(n0, n1):
            S[n + 1].addcmul_(S[n], decay[n])

    def backward_(self, n0: int, n1: int) -> None:
        """S[n] += exp(b_C) S[n + 1] for n1 > n >= n0: gradients, scanned from the end."""
        S, decay = self.chunks, self.decay
        for n in range(n1 - 1, n0 - 1, -1):
            S[n].addcmul_(S[n + 1], decay[n])


def _heads_first(state: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """A state in the op's layout (B G, Dk, R Dv) (or a (B G, Dk, R, Dv) view of it) -> (B, H, Dk, Dv)."""
    BG, Dk = state.shape[:2]
    Dv = state.numel() // (BG * Dk * lay.R)
    return state.reshape(lay.B, lay.G, Dk, lay.R, Dv).transpose(2, 3).reshape(lay.B, lay.G * lay.R, Dk, Dv)


def _gate_gradient(db, lay: _Layout, d_last, S_last, d_final, dtype) -> torch.Tensor:
    """The log-gates' gradient (B, T, H) from the cumulative gates' db (N B G, C, R): the final state's share
    <dS_T, S_T> added at the last token (``d_last``, ``S_last``: the final state's gradient and value, (B G, Dk,
    R Dv) or views of it), then summed from each token to the end."""
    B, G, C, R, N = lay.B, lay.G, lay.C, lay.R, lay.N
    db = db.view(N, B, G, C, R)
    if d_final is not None:
        Dk = S_last.shape[1]
        last = (d_last.reshape(B * G, Dk, R, -1) * S_last.reshape(B * G, Dk, R, -1)).sum((1, 3))  # (B G, R)
        db[N - 1, :, :, C - 1] += last.view(B, G, R)
    db = db.permute(1, 0, 3, 2, 4).reshape(B, lay.Tp, G * R)
    return db.flip(1).cumsum(1).flip(1)[:, : lay.T].to(dtype)


def _gradients(dQ, dK, dV, dg, d_scale, d_skip, d_initial, lay: _Layout, q, k, v) -> tuple:
    """The backward's return: dq, dk, dv back in the inputs' layouts and dtypes, then dg, the values' scale's,
    the skip's, d_initial, and None for the three non-tensor arguments."""
    G, Dv = lay.G, v.shape[-1]
    return (
        lay.unchunk(dQ, G, q.dtype),
        lay.unchunk(dK, G, k.dtype),
        lay.unchunk(dV, G, v.dtype).reshape(lay.B, lay.T, G * lay.R, Dv),
        dg,
        d_scale,
        d_skip,
        d_initial,
        None,
        None,
        None,
    )


# The intra-chunk decays are factored (``_Intra``) where a chunk's decay exp(b_C) of a head is at least exp(-2 L)
# with L this share of the log of the float range (float32: 40, float64: 319): the factors stay within exp(+-L)
FACTORED_RANGE_SHARE = 0.45


class _Intra:
    """The intra-chunk products with the decay mask factored. With r = b_C / 2 per chunk and head,
    exp(b_i - b_j) = exp(b_i - r) exp(r - b_j), both within exp(+-|b_C| / 2), so per chunk

        A_h V_h = (Q K^T * D_h) V_h = scale exp(b - r) * (tril(Q K^T) (V_h exp(r - b)))

    one (C, C) score block per group against the (C, R Dv) factor of all its heads side by side, the decays on V
    (``into``) and on the product (``out``), as (N B G, C, R, 1) factors of the wide tensors. The (chunk, head)
    pairs whose b_C is below -2 L (``FACTORED_RANGE_SHARE``), where the factors would leave the float range, have
    both factors 0 and are done exactly, with their masks, on their own (``add_forward_``, ``add_backward_``).
    With a scale of v per token and head (``vs``, (N, B, C, H)), ``into_v`` = into * vs takes it: V is then the
    unscaled values."""

    def __init__(self, b: torch.Tensor, lay: _Layout, scale: float, vs: torch.Tensor | None = None):
        N, B, G, R = lay.N, lay.B, lay.G, lay.R
        self.lay, self.scale = lay, scale
        limit = FACTORED_RANGE_SHARE * math.log(torch.finfo(b.dtype).max)
        b_last = b[:, :, -1:]  # (N, B, 1, H)
        outside = b_last < -2 * limit
        d = b - 0.5 * b_last  # b_i - r

        self.out = lay.wide(d.masked_fill(outside, float("-inf")).exp_())
        if scale != 1.0:
            self.out.mul_(scale)
        self.into = lay.wide(d.neg_().masked_fill_(outside, float("-inf")).exp_())
        self.into_v = self.into if vs is None else self.into * lay.wide(vs)
        self.pairs = self.pair_scale = None
        if bool(outside.any()):
            n, bi, h = outside[:, :, 0].nonzero(as_tuple=True)  # in the order of n
            # the pairs' rows of the chunk-major tensors, their head within the group, their cumulative gates
            self.pairs = ((n * B + bi) * G + h // R, h % R, b[n, bi, :, h])
            if vs is not None:
                self.pair_scale = vs[n, bi, :, h, None]  # (U, C, 1)
            self.bounds = torch.searchsorted(n, torch.arange(N + 1, device=n.device)).tolist()

    def scores(self, Q: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """tril(Q K^T) per group and chunk, (n, C, C)."""
        return torch.bmm(Q, K.transpose(1, 2)).tril_()

    def _exact(self, Q, K, V, n0: int, n1: int):
        """The pairs done exactly among chunks n0 <= n < n1 (None if none): their rows, heads, masked scores A
        (U, C, C), q, k (U, C, Dk) and v (U, C, Dv)."""
        if self.pairs is None or self.bounds[n0] == self.bounds[n1]:
            return None
        rows, heads, bp = (x[self.bounds[n0] : self.bounds[n1]] for x in self.pairs)
        C = self.lay.C
        Qp, Kp = Q[rows], K[rows]
        Vp = V.view(V.shape[0], C, self.lay.R, -1)[rows, :, heads]
        if self.pair_scale is not None:
            Vp = Vp * self.pair_scale[self.bounds[n0] : self.bounds[n1]]
        above = torch.ones(C, C, dtype=torch.bool, device=bp.device).triu_(1)
        M = (bp[:, :, None] - bp[:, None, :]).masked_fill_(above, float("-inf")).exp_()
        if self.scale != 1.0:
            M.mul_(self.scale)
        return rows, heads, torch.bmm(Qp, Kp.transpose(1, 2)).mul_(M), M, Qp, Kp, Vp

    def add_forward_(self, O: torch.Tensor, Q, K, V, n0: int, n1: int) -> None:
        """O (N B G, C, R Dv) += the exact pairs' A_h V_h, for chunks n0 <= n < n1."""
        exact = self._exact(Q, K, V, n0, n1)
        if exact is None:
            return
        rows, heads, A, _, _, _, Vp = exact
        O4 = O.view(O.shape[0], self.lay.C, self.lay.R, -1)
        O4[rows, :, heads] += torch.bmm(A, Vp)

    def add_backward_(self, dQ, dK, dV, dO, Q, K, V, n0: int, n1: int) -> None:
        """The exact pairs' gradients for chunks n0 <= n < n1: dV_h += A_h^T dO_h (the gradient of the scaled
        values), and dA_h = (dO_h V_h^T) * D_h into dQ and dK."""
        exact = self._exact(Q, K, V, n0, n1)
        if exact is None:
            return
        rows, heads, A, M, Qp, Kp, Vp = exact
        C, R = self.lay.C, self.lay.R
        dOp = dO.view(dO.shape[0], C, R, -1)[rows, :, heads]
        dV.view(dV.shape[0], C, R, -1)[rows, :, heads] += torch.bmm(A.transpose(1, 2), dOp)
        dA = torch.bmm(dOp, Vp.transpose(1, 2)).mul_(M)
        dQ.index_add_(0, rows, torch.bmm(dA, Kp))
        dK.index_add_(0, rows, torch.bmm(dA.transpose(1, 2), Qp))


def _skip_factor(skip: torch.Tensor, lay: _Layout, acc: torch.dtype) -> torch.Tensor:
    """skip (H,) as a (N B G, 1, R, 1) factor of the wide tensors."""
    G, R = lay.G, lay.R
    return skip.to(acc).view(1, G, R).expand(lay.N * lay.B, G, R).reshape(-1, 1, R, 1)


class GroupedChunkRetention(torch.autograd.Function):
    """Chunkwise retention for grouped q, k (formulas in the module docstring). q, k (B, T, G, Dk), v (B, T, H, Dv)
    with R = H / G > 1, g (B, T, H); initial and final states (B, H, Dk, Dv)."""

    @staticmethod
    def forward(ctx, q, k, v, g, v_scale, skip, initial_state, scale, chunk_size, output_final_state):
        with torch.autocast(q.device.type, enabled=False):
            return GroupedChunkRetention._forward(
                ctx, q, k, v, g, v_scale, skip, initial_state, scale, chunk_size, output_final_state
            )

    @staticmethod
    def _forward(ctx, q, k, v, g, v_scale, skip, initial_state, scale, chunk_size, output_final_state):
        B, T, G, Dk = q.shape
        H, Dv = v.shape[2:]
        R = H // G
        lay = _Layout(B, T, G, R, chunk_size)
        N, C, BG = lay.N, lay.C, B * G
        acc = state_dtype(q.dtype)
        Q, K = lay.chunks(q, G, acc), lay.chunks(k, G, acc)  # (N B G, C, Dk)
        V = lay.chunks(v.reshape(B, T, G, R * Dv), G, acc)  # (N B G, C, R Dv)
        gates = _Gates(g, lay, acc)
        w_q = gates.q(scale, lay)
        vs_tok = None if v_scale is None else lay.per_token(v_scale, acc)  # (N, B, C, H)
        w_k = gates.k if vs_tok is None else gates.k * lay.wide(vs_tok)  # the values' scale in their factors
        intra = _Intra(gates.b, lay, scale, vs_tok)
        skip_w = None if skip is None else _skip_factor(skip, lay, acc)
        S = torch.empty(N + 1, BG, Dk, R * Dv, dtype=acc, device=q.device)  # S[n] enters chunk n; S[N]: final
        _initial_states(S[0], initial_state, lay)
        scan = _Scan(S, gates)
        O = V.new_empty(V.shape)
        for n0, n1 in _segments(lay, H, Dv):
            rows = slice(n0 * BG, n1 * BG)
            Qs, Ks, Vs = Q[rows], K[rows], V[rows]
            scan.forward_(Ks, _times(Vs, w_k[rows]), n0, n1)
            Os = O[rows]
            torch.bmm(Qs, S[n0:n1].view(-1, Dk, R * Dv), out=Os)
            Os4 = Os.view(-1, C, R, Dv)
            Os4.mul_(w_q[rows])
            # intra-chunk: one score block per group against all its heads, the decays factored on either side
            Y = torch.bmm(intra.scores(Qs, Ks), _times(Vs, intra.into_v[rows]))
            Os4.addcmul_(Y.view(-1, C, R, Dv), intra.out[rows])
            del Y
            intra.add_forward_(O, Q, K, V, n0, n1)
            if skip_w is not None:  # the skip term on the values as given
                Os4.addcmul_(Vs.view(-1, C, R, Dv), skip_w[rows])
        final = _heads_first(S[N], lay).clone() if output_final_state else None
        kept = chunk.keep_chunk_states(Dk, Dv, C)
        ctx.save_for_backward(q, k, v, gates.b, v_scale, skip, S if kept else None, O, initial_state)
        ctx.meta = (lay, scale, Dv, g.dtype)
        out = lay.unchunk(O, G, v.dtype).reshape(B, T, H, Dv)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        with torch.autocast(d_out.device.type, enabled=False):
            return GroupedChunkRetention._backward(ctx, d_out, d_final)

    @staticmethod
    def _backward(ctx, d_out, d_final):
        q, k, v, b, v_scale, skip, S, O, initial_state = ctx.saved_tensors
        lay, scale, Dv, g_dtype = ctx.meta
        B, T, G, R, N, C = lay.B, lay.T, lay.G, lay.R, lay.N, lay.C
        Dk = q.shape[-1]
        H, BG = G * R, B * G
        acc = b.dtype
        Q, K = lay.chunks(q, G, acc), lay.chunks(k, G, acc)
        V = lay.chunks(v.reshape(B, T, G, R * Dv), G, acc)
        gates = _Gates.from_cumulative(b, lay)
        w_q = gates.q(scale, lay)
        vs_tok = None if v_scale is None else lay.per_token(v_scale, acc)  # (N, B, C, H)
        vs = None if vs_tok is None else lay.wide(vs_tok)  # (N B G, C, R, 1)
        w_k = gates.k if vs is None else gates.k * vs
        intra = _Intra(b, lay, scale, vs_tok)
        segments = _segments(lay, H, Dv)
        if S is None:  # not kept: recomputed
            S = torch.empty(N + 1, BG, Dk, R * Dv, dtype=acc, device=q.device)
            _initial_states(S[0], initial_state, lay)
            scan = _Scan(S, gates)
            for n0, n1 in segments:
                rows = slice(n0 * BG, n1 * BG)
                scan.forward_(K[rows], _times(V[rows], w_k[rows]), n0, n1)
        dO = lay.chunks(d_out.reshape(B, T, G, R * Dv), G, acc)  # (N B G, C, R Dv)

        # dS[n]: the gradient of the state entering chunk n, dS[N] = dS_final; segments from the last one
        dS = torch.empty_like(S)
        if d_final is not None:
            dS[N].view(B, G, Dk, R, Dv).copy_(d_final.view(B, G, R, Dk, Dv).transpose(2, 3))
        else:
            dS[N].zero_()
        back = _Scan(dS, gates)
        dQ, dK, dV = Q.new_empty(Q.shape), K.new_empty(K.shape), V.new_empty(V.shape)
        need_dg = ctx.needs_input_grad[3]
        need_vs = vs is not None and ctx.needs_input_grad[4]
        skip_w = None if skip is None else _skip_factor(skip, lay, acc)
        # the skip term: its gradient dO . v per head and token (v as given), summed over tokens at the end
        d_skip = torch.empty(N * BG, C, R, dtype=acc, device=q.device) if skip is not None else None
        db = torch.empty(N * BG, C, R, dtype=acc, device=q.device) if need_dg else None
        # the values' scale: d(scale) = dv . v_unscaled per head and token, dv the scaled values' gradient
        d_vs = torch.empty(N * BG, C, R, dtype=acc, device=q.device) if vs is not None else None
        for n0, n1 in reversed(segments):
            rows = slice(n0 * BG, n1 * BG)
            Qs, Ks, Vs, dOs = Q[rows], K[rows], V[rows], dO[rows]
            # intra-chunk, factored: dP = tril(dY X^T) with dY = dO * out and X = V * into, the group's heads
            # summed inside the product; dX = P^T dY
            dY = _times(dOs, intra.out[rows])
            dP = torch.bmm(dY, _times(Vs, intra.into_v[rows]).transpose(1, 2)).tril_()  # (L B G, C, C)
            torch.bmm(dP, Ks, out=dQ[rows])
            torch.bmm(dP.transpose(1, 2), Qs, out=dK[rows])
            del dP
            dX = torch.bmm(intra.scores(Qs, Ks).transpose(1, 2), dY)
            del dY
            # the states: each chunk's direct use, then scanned back from the state after the segment
            dOq = _times(dOs, w_q[rows])
            torch.bmm(Qs.transpose(1, 2), dOq, out=dS[n0:n1].view(-1, Dk, R * Dv))
            back.backward_(n0, n1)
            dQ[rows].baddbmm_(dOq, S[n0:n1].view(-1, Dk, R * Dv).transpose(1, 2))
            del dOq
            dS_after = dS[n0 + 1 : n1 + 1].view(-1, Dk, R * Dv)
            dK[rows].baddbmm_(_times(Vs, w_k[rows]), dS_after.transpose(1, 2))
            dVs = dV[rows]
            torch.bmm(Ks, dS_after, out=dVs)
            dVs.view(-1, C, R, Dv).mul_(gates.k[rows]).addcmul_(dX.view(-1, C, R, Dv), intra.into[rows])
            del dX
            intra.add_backward_(dQ, dK, dV, dO, Q, K, V, n0, n1)
            dV4, Vs4, dOs4 = dVs.view(-1, C, R, Dv), Vs.view(-1, C, R, Dv), dOs.view(-1, C, R, Dv)
            if need_dg:  # dO . o with o the retention's own output: O holds it plus the skip term
                torch.linalg.vecdot(dOs4, O[rows].view(-1, C, R, Dv), out=db[rows])
            if skip_w is not None:
                dsk = d_skip[rows]
                torch.linalg.vecdot(dOs4, Vs4, out=dsk)
                if need_dg:
                    db[rows].addcmul_(dsk, skip_w[rows, ..., 0], value=-1)
            if vs is None:
                if need_dg:  # - v . dv
                    db[rows].sub_(torch.linalg.vecdot(Vs4, dV4))
            else:
                # dVs is the scaled values' gradient: d(scale) from it, then v's own, dVs times the scale
                dvs = d_vs[rows]
                torch.linalg.vecdot(dV4, Vs4, out=dvs)
                if need_dg:  # - (v scale) . dv = - scale d(scale)
                    db[rows].addcmul_(dvs, vs[rows, :, :, 0], value=-1)
                dV4.mul_(vs[rows])
            if skip_w is not None:
                dV4.addcmul_(dOs4, skip_w[rows])

        dg = _gate_gradient(db, lay, back.chunks[N], S[N], d_final, g_dtype) if need_dg else None
        d_scale = lay.unwide(d_vs).to(v_scale.dtype) if need_vs else None
        d_skip_h = None
        if skip is not None and ctx.needs_input_grad[5]:
            d_skip_h = d_skip.view(N * B, G, C, R).sum((0, 2)).reshape(G * R).to(skip.dtype)
        d_initial = None
        if initial_state is not None:
            d_initial = _heads_first(back.chunks[0], lay).to(initial_state.dtype)
        return _gradients(dQ, dK, dV, dg, d_scale, d_skip_h, d_initial, lay, q, k, v)


@torch.compiler.disable
def grouped_chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
    v_scale: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped chunkwise retention: q, k (B, T, G, Dk), v (B, T, H, Dv) with G < H dividing H, g (B, T, H) log-gates,
    T > 0; states (B, H, Dk, Dv); the values v * v_scale[..., None] when ``v_scale`` (B, T, H) is given, the scale
    taken into the decay factors; plus skip[h] * v (H,) when ``skip`` is given. Runs eagerly inside a
    ``torch.compile``d model, as ``chunk.py``'s op."""
    return GroupedChunkRetention.apply(
        q, k, v, g, v_scale, skip, initial_state, scale, chunk_size, output_final_state
    )
