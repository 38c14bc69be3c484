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

Only A_h V_h and the two products of its backward stay per head. Backward, with G_n the gradient of the state
entering chunk n (G_N = dS_final):

    dA_h = (dO_h V_h^T) * D_h
    dQ   = (sum_h dA_h) K   + (dO * w_q) S_in^T
    dK   = (sum_h dA_h)^T Q + (V * w_k) G_{n+1}^T
    dV_h = A_h^T dO_h       + (K G_{n+1}) * w_k
    G_n  = exp(b_C) G_{n+1} + Q^T (dO * w_q)

where (dO * w_q) S_in^T and (V * w_k) G_{n+1}^T, (C, R Dv) @ (R Dv, Dk), sum a group's heads inside the product.
The log-gates' gradient
needs, per head, q_i . dq_i - k_i . dk_i (see ``chunk.py``); the outputs and final state are linear in q_i and
bilinear in (k_j, v_j) jointly, so q_i . dq_i = dO_i . o_i and k_j . dk_j = v_j . dv_j for each head: two dot
products over Dv of tensors the backward has anyway, with no per-head dQ or dK.

Forward and backward run through the chunks a segment at a time (``_segments``: about 2^18 numbers per per-head
block, 512 tokens for 32 heads of 16 x 16), so that a segment's intermediates are still in cache when the next
product reads them (the backward from the last segment, carrying the states' gradient); on a CPU this measured
about 1.2x faster than whole-sequence passes. The decay masks D_h (the forward's exps) are kept for the backward
instead of the scores, and the output for the gates' gradient; the per-chunk states are kept on the same condition
as in ``chunk.py`` (``keep_chunk_states``). Packed documents and row sums go through ``chunk.py``.
"""

from __future__ import annotations

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
        """(B, T, X, D) -> (N * B * X, C, D), contiguous, in ``dtype`` (a view when B = X = 1, T fills the chunks
        and x is contiguous)."""
        B, N, C = self.B, self.N, self.C
        if self.Tp != self.T:
            x = F.pad(x, (0, 0, 0, 0, 0, self.Tp - self.T))
        D = x.shape[-1]
        x = x.to(dtype).reshape(B, N, C, X, D).permute(1, 0, 3, 2, 4)
        return x.reshape(N * B * X, C, D).contiguous()

    def unchunk(self, x: torch.Tensor, X: int, dtype: torch.dtype) -> torch.Tensor:
        """(N * B * X, C, D) -> (B, T, X, D) in ``dtype``."""
        B, N, C = self.B, self.N, self.C
        D = x.shape[-1]
        x = x.view(N, B, X, C, D).permute(1, 0, 3, 2, 4).reshape(B, self.Tp, X, D)
        return x[:, : self.T].to(dtype)

    def per_head(self, wide: torch.Tensor, Dv: int) -> torch.Tensor:
        """Wide (N * B * G, C, R Dv) -> per head (N * B * H, C, Dv), a copy."""
        C, R = self.C, self.R
        x = wide.view(-1, C, R, Dv).transpose(1, 2)
        return x.reshape(-1, C, Dv)

    def add_per_head_(self, wide: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
        """wide (N * B * G, C, R Dv) += per_head (N * B * H, C, Dv), in place."""
        C, R = self.C, self.R
        Dv = per_head.shape[-1]
        wide.view(-1, C, R, Dv).add_(per_head.view(-1, R, C, Dv).transpose(1, 2))
        return wide


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

    def mask_into(self, out: torch.Tensor, n0: int, n1: int, scale: float) -> None:
        """out (L B H, C, C) = the decay masks of chunks n0 <= n < n1: scale exp(b_i - b_j) for i >= j, else 0; the
        exponents masked before exp (b_i - b_j > 0 above the diagonal may overflow)."""
        C = self.b.shape[2]
        bh = self.b[n0:n1].transpose(2, 3)  # (L, B, H, C)
        M = out.view(*bh.shape, C)
        torch.sub(bh[..., :, None], bh[..., None, :], out=M)
        above = torch.ones(C, C, dtype=torch.bool, device=M.device).triu_(1)
        M.masked_fill_(above, float("-inf")).exp_()
        if scale != 1.0:
            M.mul_(scale)


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


class GroupedChunkRetention(torch.autograd.Function):
    """Chunkwise retention for grouped q, k (formulas in the module docstring). q, k (B, T, G, Dk), v (B, T, H, Dv)
    with R = H / G > 1, g (B, T, H); initial and final states (B, H, Dk, Dv)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state):
        with torch.autocast(q.device.type, enabled=False):
            return GroupedChunkRetention._forward(
                ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state
            )

    @staticmethod
    def _forward(ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state):
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
        M = torch.empty(N * B * H, C, C, dtype=acc, device=q.device)  # the decay masks, kept for the backward
        S = torch.empty(N + 1, BG, Dk, R * Dv, dtype=acc, device=q.device)  # S[n] enters chunk n; S[N]: final
        _initial_states(S[0], initial_state, lay)
        scan = _Scan(S, gates)
        O = torch.empty_like(V)
        for n0, n1 in _segments(lay, H, Dv):
            rows = slice(n0 * BG, n1 * BG)
            Qs, Ks, Vs, Ms = Q[rows], K[rows], V[rows], M[n0 * B * H : n1 * B * H]
            gates.mask_into(Ms, n0, n1, scale)
            # intra-chunk: one score block per group, each head's mask on it
            A = (torch.bmm(Qs, Ks.transpose(1, 2))[:, None] * Ms.view(-1, R, C, C)).view(-1, C, C)
            O_intra = torch.bmm(A, lay.per_head(Vs, Dv))  # (L B H, C, Dv)
            del A
            scan.forward_(Ks, _times(Vs, gates.k[rows]), n0, n1)
            Os = O[rows]
            torch.bmm(Qs, S[n0:n1].view(-1, Dk, R * Dv), out=Os)
            Os.view(-1, C, R, Dv).mul_(w_q[rows])
            lay.add_per_head_(Os, O_intra)
            del O_intra

        final = None
        if output_final_state:
            final = S[N].view(B, G, Dk, R, Dv).transpose(2, 3).reshape(B, H, Dk, Dv).clone()
        kept = chunk.keep_chunk_states(Dk, Dv, C)
        ctx.save_for_backward(q, k, v, gates.b, M, S if kept else None, O, initial_state)
        ctx.meta = (lay, scale, Dv, g.dtype)
        out = lay.unchunk(O, G, v.dtype).reshape(B, T, H, Dv)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        with torch.autocast(d_out.device.type, enabled=False):
            return GroupedChunkRetention._backward(ctx, d_out, d_final)

    @staticmethod
    def _backward(ctx, d_out, d_final):
        q, k, v, b, M, S, O, initial_state = ctx.saved_tensors
        lay, scale, Dv, g_dtype = ctx.meta
        B, T, G, R, N, C = lay.B, lay.T, lay.G, lay.R, lay.N, lay.C
        Dk = q.shape[-1]
        H, BG = G * R, B * G
        acc = M.dtype
        Q, K = lay.chunks(q, G, acc), lay.chunks(k, G, acc)
        V = lay.chunks(v.reshape(B, T, G, R * Dv), G, acc)
        gates = _Gates.from_cumulative(b, lay)
        w_q = gates.q(scale, lay)
        segments = _segments(lay, H, Dv)
        if S is None:  # not kept: recomputed
            S = torch.empty(N + 1, BG, Dk, R * Dv, dtype=acc, device=q.device)
            _initial_states(S[0], initial_state, lay)
            scan = _Scan(S, gates)
            for n0, n1 in segments:
                rows = slice(n0 * BG, n1 * BG)
                scan.forward_(K[rows], _times(V[rows], gates.k[rows]), n0, n1)
        dO = lay.chunks(d_out.reshape(B, T, G, R * Dv), G, acc)  # (N B G, C, R Dv)
        need_dg = ctx.needs_input_grad[3]

        # dS[n]: the gradient of the state entering chunk n, dS[N] = dS_final; segments from the last one
        dS = torch.empty_like(S)
        if d_final is not None:
            dS[N].view(B, G, Dk, R, Dv).copy_(d_final.view(B, G, R, Dk, Dv).transpose(2, 3))
        else:
            dS[N].zero_()
        back = _Scan(dS, gates)
        dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)
        db = torch.empty(N * BG, C, R, dtype=acc, device=q.device) if need_dg else None
        for n0, n1 in reversed(segments):
            rows = slice(n0 * BG, n1 * BG)
            Qs, Ks, Vs, dOs, Ms = Q[rows], K[rows], V[rows], dO[rows], M[n0 * B * H : n1 * B * H]
            dO_h, V_h = lay.per_head(dOs, Dv), lay.per_head(Vs, Dv)  # (L B H, C, Dv)
            # intra-chunk
            A = (torch.bmm(Qs, Ks.transpose(1, 2))[:, None] * Ms.view(-1, R, C, C)).view(-1, C, C)
            dV_h = torch.bmm(A.transpose(1, 2), dO_h)
            del A
            dA = torch.bmm(dO_h, V_h.transpose(1, 2)).mul_(Ms)  # (L B H, C, C)
            del dO_h, V_h
            dA = dA.view(-1, R, C, C).sum(1)  # (L B G, C, C): the group's heads share the scores
            torch.bmm(dA, Ks, out=dQ[rows])
            torch.bmm(dA.transpose(1, 2), Qs, out=dK[rows])
            del dA
            # the states: each chunk's direct use, then scanned back from the state after the segment
            dOq = _times(dOs, w_q[rows])
            torch.bmm(Qs.transpose(1, 2), dOq, out=dS[n0:n1].view(-1, Dk, R * Dv))
            back.backward_(n0, n1)
            dQ[rows].baddbmm_(dOq, S[n0:n1].view(-1, Dk, R * Dv).transpose(1, 2))
            del dOq
            dS_after = dS[n0 + 1 : n1 + 1].view(-1, Dk, R * Dv)
            dK[rows].baddbmm_(_times(Vs, gates.k[rows]), dS_after.transpose(1, 2))
            dVs = dV[rows]
            torch.bmm(Ks, dS_after, out=dVs)
            dVs.view(-1, C, R, Dv).mul_(gates.k[rows])
            lay.add_per_head_(dVs, dV_h)
            del dV_h
            if need_dg:
                # dL/dB_i per head: q_i . dq_i - k_i . dk_i = dO_i . o_i - v_i . dv_i (module docstring)
                dbs = db[rows]
                torch.linalg.vecdot(dOs.view(-1, C, R, Dv), O[rows].view(-1, C, R, Dv), out=dbs)
                dbs.sub_(torch.linalg.vecdot(Vs.view(-1, C, R, Dv), dVs.view(-1, C, R, Dv)))

        dg = None
        if need_dg:
            db = db.view(N, B, G, C, R)
            if d_final is not None:  # and <dS_T, S_T> at the last token
                last = (back.chunks[N] * S.view(N + 1, BG, Dk, R, Dv)[N]).sum((1, 3))  # (B G, R)
                db[N - 1, :, :, C - 1] += last.view(B, G, R)
            db = db.permute(1, 0, 3, 2, 4).reshape(B, lay.Tp, H)
            dg = db.flip(1).cumsum(1).flip(1)[:, :T].to(g_dtype)

        d_initial = None
        if initial_state is not None:
            d_initial = back.chunks[0].view(B, G, Dk, R, Dv).transpose(2, 3).reshape(B, H, Dk, Dv)
            d_initial = d_initial.to(initial_state.dtype)
        return (
            lay.unchunk(dQ, G, q.dtype),
            lay.unchunk(dK, G, k.dtype),
            lay.unchunk(dV, G, v.dtype).reshape(B, T, H, Dv),
            dg,
            d_initial,
            None,
            None,
            None,
        )


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped chunkwise retention: q, k (B, T, G, Dk), v (B, T, H, Dv) with G < H dividing H, g (B, T, H) log-gates,
    T > 0; states (B, H, Dk, Dv). Runs eagerly inside a ``torch.compile``d model, as ``chunk.py``'s op."""
    return GroupedChunkRetention.apply(q, k, v, g, initial_state, scale, chunk_size, output_final_state)
