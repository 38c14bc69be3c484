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

Packed documents (``cu_seqlens``, B == 1) run in the same single pass over the chunks of the flattened sequence,
with masks instead of a loop over documents (``_Documents``): scores only between tokens of the same document
(D_ij = 0 across a boundary); the state carried into a chunk is read only by the document that was running when
the chunk started, and only if it started in an earlier chunk; the state carried out is written only by the
tokens after the last document start in the chunk, and passes through a chunk only if no document starts in it.
These are 0/1 factors on the score block, on exp(b), on exp(b_C - b) and on exp(b_C), so every formula above and
the log-gate identity hold unchanged (a log-gate of -inf at a start would give exp(-inf - -inf) = nan in the
differences instead). A document's initial state (read by its tokens in the chunk where it starts, scaled by
exp(b_i - b_{s-1})) and its final state (at its last token, anywhere in a chunk) are per-document terms computed
on the one or two chunks the document starts and ends in (``_DocumentEnds``), batched over documents; they add
-<dS_0, S_0> at the token before the start and <dS_T, S_T> at the last token to dL/dB.

Grouped q and k (G heads for the H heads of v, head h reading group h // R with R = H / G, as Mamba-2 shares B
and C among the heads of a group: Dao & Gu 2024, arXiv:2405.21060) stay (N, B*G, C, Dk): the scores Q K^T are one
(C, C) block per group, which each of its R heads multiplies by its own decay mask; Q * exp(b) and K * exp(b_C - b)
broadcast a group over its heads (``_per_head``). In the backward, the scores' gradient is summed over a group's
heads before the two matmuls that give dQ and dK (d(Q K^T) = sum_h dA_h), the per-head terms through the states
are summed after them (``_group_sum``), and the gate gradient's share from the scores, q_i . dq_i - k_i . dk_i of
the head alone, is read off the per-head product P = dP * A (dP = dO V^T) as sum_j P_ij - sum_j P_ji. Grouped
calls without packed documents or row sums (Mamba-2's training and prefill) take ``grouped.py`` instead, which runs
the state products once per group on its heads side by side, in the caller's time-major layout.

Layout: chunk-major (N, B*H, C, D), so that the state of chunk n is one contiguous block. A fixed per-head decay
(an [H] decay broadcast over batch and time) shares one (C, C) decay block across all chunks. Memory is
O(T * C + T / C * Dk * Dv): linear in T. The per-chunk states are kept for the backward only while they are no
larger than q, k and v (``keep_chunk_states``); otherwise the backward recomputes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.ops.retention.naive import state_dtype


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


class _Documents:
    """Documents packed along T (``cu_seqlens``, B == 1), seen from the chunks: the 0/1 masks of the module
    docstring, and where each document starts and ends."""

    def __init__(self, cu_seqlens: torch.Tensor, N: int, C: int, device: torch.device):
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        self.count = cu.numel() - 1
        self.num_chunks = N
        # the document of every position; the padded tail past T joins the last one (its k, v and g are zero)
        positions = torch.arange(N * C, device=device)
        doc = torch.bucketize(positions, cu[1:], right=True).clamp_(max=self.count - 1).view(N, C)
        carried = torch.zeros(N, dtype=torch.bool, device=device)  # the chunk starts inside a document
        carried[1:] = doc[1:, 0] == doc[:-1, -1]
        self.doc = doc  # (N, C)
        self.same = doc[:, :, None] == doc[:, None, :]  # (N, C, C)
        self.reads = (doc == doc[:, :1]) & carried[:, None]  # (N, C): reads the state carried in
        self.writes = doc == doc[:, -1:]  # (N, C): writes the state carried out
        self.passes = carried & (doc[:, 0] == doc[:, -1])  # (N,): the carried state crosses the whole chunk
        start, stop = cu[:-1], cu[1:]
        self.ids = (stop > start).nonzero()[:, 0]  # the non-empty documents
        self.empty = (stop == start).nonzero()[:, 0]  # these only pass their initial state on as final state
        self.first = start[self.ids]  # (Dn,) flat position of each non-empty document's first token
        self.last = stop[self.ids] - 1  # (Dn,) and of its last

    def per_document(self, nonempty: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
        """One row per document (D, ...) from the rows of the non-empty ones and those of all D (or zero) for the
        empty ones."""
        out = nonempty.new_zeros(self.count, *nonempty.shape[1:])
        out[self.ids] = nonempty
        if empty is not None and self.empty.numel():
            out[self.empty] = empty[self.empty].to(out.dtype)
        return out


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Chunks ``idx`` of a per-chunk factor, or the factor shared by all chunks, repeated."""
    return x[idx] if x.shape[0] > 1 else x.expand(idx.numel(), *x.shape[1:])


class _DocumentEnds:
    """Decay factors of the per-document terms, one row per non-empty document (Dn of them). A document's first
    token is at position a of chunk m, its last at position p of chunk n; b_{a-1} = 0 when a = 0.

        w_start (Dn, BH, C, 1) = exp(b_i - b_{a-1}) on its tokens of chunk m: how its initial state reaches them
        w_end   (Dn, BH, C, 1) = exp(b_p - b_j) on its tokens of chunk n: how they reach its final state
        carried (Dn, BH, 1, 1) = exp(b_p) if m < n: the state entering chunk n reaches the final state
        h0_end  (Dn, BH, 1, 1) = exp(b_p - b_{a-1}) if m == n: the initial state reaches the final state
        h0_out  (Dn, BH, 1, 1) = exp(b_C - b_{a-1}) if m < n: the initial state is in the state leaving chunk m

    Each exponent is masked before ``exp`` (an unrelated b_i - b_{a-1} may be positive and huge). ``groups`` cut
    the documents into slices of at most N: each gathers one chunk per document, so no more than the sequence.
    """

    def __init__(self, docs: _Documents, b: torch.Tensor):
        C, BH = b.shape[-1], b.shape[1]
        ids = docs.ids
        self.m, a = docs.first // C, docs.first % C
        self.n, p = docs.last // C, docs.last % C
        b_m, b_n = _pick(b, self.m), _pick(b, self.n)  # (Dn, BH, C)
        before = b_m.gather(2, (a - 1).clamp(min=0)[:, None, None].expand(-1, BH, 1))
        before = torch.where((a > 0)[:, None, None], before, 0.0)  # (Dn, BH, 1): b_{a-1}
        at_end = b_n.gather(2, p[:, None, None].expand(-1, BH, 1))  # (Dn, BH, 1): b_p
        inf = float("-inf")
        in_m = (docs.doc[self.m] == ids[:, None])[:, None]  # (Dn, 1, C)
        in_n = (docs.doc[self.n] == ids[:, None])[:, None]
        self.w_start = torch.where(in_m, b_m - before, inf).exp_()[..., None]
        self.w_end = torch.where(in_n, at_end - b_n, inf).exp_()[..., None]
        one_chunk = (self.m == self.n)[:, None, None]
        self.carried = torch.where(one_chunk, inf, at_end).exp_()[..., None]
        self.h0_end = torch.where(one_chunk, at_end - before, inf).exp_()[..., None]
        self.h0_out = torch.where(one_chunk, inf, b_m[..., -1:] - before).exp_()[..., None]
        size = max(docs.num_chunks, 1)
        self.groups = [slice(lo, lo + size) for lo in range(0, ids.numel(), size)]


class _Decays:
    """The decay factors of one call, derived from the cumulative gates b (and the documents' masks when packed);
    recomputed in the backward."""

    def __init__(self, b: torch.Tensor, scale: float, docs: _Documents | None = None):
        C = b.shape[-1]
        b_last = b[..., -1:]
        allowed = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
        # (N, 1, C, C): the documents' mask, where it is kept apart from a shared decay block
        self.same = None
        if docs is not None:
            if b.shape[0] == docs.num_chunks:
                allowed = allowed & docs.same[:, None]  # (N, 1, C, C)
            else:  # a fixed decay shares one (C, C) block; the masks multiply it, in place, where it is applied
                self.same = docs.same[:, None].to(b.dtype)
        self.mask = torch.where(allowed, b[..., :, None] - b[..., None, :], float("-inf")).exp_().mul_(scale)
        self.q = b.exp().mul_(scale)[..., None]  # (n, BH, C, 1): scale * decay from chunk start to i
        self.k = (b_last - b).exp_()[..., None]  # (n, BH, C, 1): decay from j to chunk end
        self.chunk = b_last.exp()[..., None]  # (n, BH, 1, 1): decay across the whole chunk
        if docs is not None:
            self.q = self.q * docs.reads[:, None, :, None]
            self.k = self.k * docs.writes[:, None, :, None]
            self.chunk = self.chunk * docs.passes[:, None, None, None]

    def mask_(self, scores: torch.Tensor) -> torch.Tensor:
        """Apply the decay mask D (and the documents' mask) to (N, BH, C, C) scores, in place."""
        scores.mul_(self.mask)
        return scores if self.same is None else scores.mul_(self.same)

    def masked(self, scores: torch.Tensor, R: int) -> torch.Tensor:
        """The decayed scores of every head, (N, BH, C, C), from (N, BG, C, C) scores that the R heads of each group
        share (in place when R == 1)."""
        if R == 1:
            return self.mask_(scores)
        A = _per_head(scores, self.mask, R)
        return A if self.same is None else A.mul_(self.same)


def _per_head(x: torch.Tensor, w: torch.Tensor, R: int) -> torch.Tensor:
    """x (n, B*G, C, D), one row per group of R heads, times a per-head factor w (m, B*H, C or 1, D or 1), as
    (max(n, m), B*H, C, D): each group's row broadcast over its heads h = g R + r, without copying x first."""
    if R == 1:
        return x * w
    out = x[:, :, None] * w.view(w.shape[0], x.shape[1], R, *w.shape[2:])  # (n, B*G, R, C, D)
    return out.flatten(1, 2)


def _group_sum(x: torch.Tensor, R: int) -> torch.Tensor:
    """(n, B*H, ...) per head -> (n, B*G, ...): the sum over the R heads of each group."""
    return x if R == 1 else x.view(x.shape[0], -1, R, *x.shape[2:]).sum(2)


def _dot_per_head(x: torch.Tensor, y: torch.Tensor, R: int) -> torch.Tensor:
    """sum_d x[.., d] y[.., d] per head, (N, B*H, C), for x (N, B*G, C, D) shared by the R heads of a group and
    y (N, B*H, C, D)."""
    if R == 1:
        return (x * y).sum(-1)
    N, BG, C, D = x.shape
    return (x[:, :, None] * y.view(N, BG, R, C, D)).sum(-1).flatten(1, 2)


def _add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool) -> None:
    """out += a * b, or out = a * b where ``out`` holds nothing yet (``add`` False), in place."""
    if add:
        out.addcmul_(a, b)
    else:
        torch.mul(a, b, out=out)


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


def _scan_states(
    U: torch.Tensor, d: _Decays, S0: torch.Tensor | None, starts: tuple | None = None
) -> torch.Tensor:
    """The state after each chunk, (N, BH, Dk, D), from each chunk's own update U, scanned in place:
    S[n] = exp(b_C) S[n - 1] + U[n], with S[-1] the initial state ``S0`` (or zero). ``starts`` (chunks, states)
    adds packed documents' initial states to the chunks they start in (those still running at the chunk's end)."""
    S = U
    if starts is not None:
        S.index_add_(0, *starts)
    if S0 is not None:
        S[0].addcmul_(S0, _at(d.chunk, 0))
    for n in range(1, S.shape[0]):
        S[n].addcmul_(S[n - 1], _at(d.chunk, n))
    return S


def _chunk_states(K_end, V, d: _Decays, S0, starts=None) -> torch.Tensor:
    """The (Dk, Dv) state after each chunk: each chunk's own update K_end^T V, scanned (``_scan_states``)."""
    return _scan_states(_bmm(K_end.transpose(-1, -2), V), d, S0, starts)


def _read_states(O: torch.Tensor, Q_start: torch.Tensor, S: torch.Tensor, S0: torch.Tensor | None) -> None:
    """O[n] += Q_start[n] S[n - 1]: each chunk reads the state the previous one left (chunk 0: ``S0``)."""
    _baddbmm_(O[1:], Q_start[1:], S[:-1])
    if S0 is not None:
        O[0].baddbmm_(Q_start[0], S0)


def _read_initial_states(O, Q, ends: _DocumentEnds, H0: torch.Tensor, scale: float, R: int) -> None:
    """O += each packed document's initial state H0 (Dn, BH, Dk, D), read by its tokens of the chunk it starts in."""
    for sl in ends.groups:
        m = ends.m[sl]
        O.index_add_(0, m, _bmm(_per_head(Q[m], ends.w_start[sl] * scale, R), H0[sl]))


def _final_states(K, V, S, ends: _DocumentEnds, H0: torch.Tensor | None, R: int) -> torch.Tensor:
    """The state after each non-empty packed document's last token, (Dn, BH, Dk, D), from its tokens of the chunk
    it ends in, the state ``S`` left by the chunk before (if it started earlier) and its initial state ``H0`` (if
    it started in that chunk). ``V`` None: a value of ones (the key sums)."""
    parts = []
    for sl in ends.groups:
        n = ends.n[sl]
        K_end = _per_head(K[n], ends.w_end[sl], R)
        S_n = K_end.sum(2)[..., None] if V is None else _bmm(K_end.transpose(-1, -2), V[n])
        S_n.addcmul_(S[(n - 1).clamp(min=0)], ends.carried[sl])
        if H0 is not None:
            S_n.addcmul_(H0[sl], ends.h0_end[sl])
        parts.append(S_n)
    return torch.cat(parts)


class ChunkRetention(torch.autograd.Function):
    """Chunkwise retention with a hand-written backward (formulas in the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state, row_sum, cu_seqlens):
        # everything runs in the accumulation dtype, whatever autocast would pick for the matmuls
        with torch.autocast(q.device.type, enabled=False):
            args = (q, k, v, g, initial_state, scale, chunk_size, output_final_state, row_sum, cu_seqlens)
            return ChunkRetention._forward(ctx, *args)

    @staticmethod
    def _forward(ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state, row_sum, cu_seqlens):
        B, T, G, Dk = q.shape
        H, Dv = v.shape[2:]
        R = H // G  # heads per group of q and k
        key_sum0 = None
        if row_sum and initial_state is not None:  # the last column is the decayed key sum
            initial_state, key_sum0 = initial_state[..., :Dv], initial_state[..., Dv:]
        C = chunk_size
        N = -(-T // C)
        acc = state_dtype(q.dtype)
        Q, K, V = (_to_chunks(x, N, C, acc) for x in (q, k, v))  # (N, BG, C, Dk) for q, k; (N, BH, C, Dv)
        b = _cumulative_gates(g, N, C, acc)
        docs = None if cu_seqlens is None else _Documents(cu_seqlens, N, C, q.device)
        d = _Decays(b, scale, docs)
        # initial states: one per row entering chunk 0 (S0), or one per packed document entering wherever that
        # document starts (H0, with B == 1: (documents, H, Dk, Dv))
        S0 = H0 = ends = starts = None
        if initial_state is not None and docs is None:
            S0 = initial_state.reshape(B * H, Dk, Dv).to(acc)
        elif initial_state is not None:
            H0 = initial_state.to(acc)
        if docs is not None and (H0 is not None or output_final_state):
            ends = _DocumentEnds(docs, b)
        if H0 is not None:
            starts = (ends.m, H0[docs.ids] * ends.h0_out)

        # one score block per group, each head's decay mask on it: (N, BH, C, C)
        A = d.masked(_bmm(Q, K.transpose(-1, -2)), R)
        K_end = _per_head(K, d.k, R)  # (N, BH, C, Dk)
        S_out = _chunk_states(K_end, V, d, S0, starts)

        Q_start = _per_head(Q, d.q, R)
        O = _bmm(A, V)  # (N, BH, C, Dv); chunk n > 0 reads the state S_out[n - 1] left by chunk n - 1
        _read_states(O, Q_start, S_out, S0)
        if H0 is not None:
            _read_initial_states(O, Q, ends, H0[docs.ids], scale, R)
        # The states cost Dk * Dv / C numbers per token and head. They are kept for the backward when that is no
        # more than q, k and v cost (2 Dk + Dv); beyond (large heads, small chunks: Dk = 256, Dv = 512, C = 64
        # would be 2048 against 1024) the backward recomputes them, one more matmul and scan, so that memory
        # stays a small multiple of the inputs'.
        ctx.kept_states = keep_chunk_states(Dk, Dv, C)
        final = None
        if output_final_state and docs is None:
            # a copy: a view would keep every chunk's state alive for as long as the caller keeps the final one
            final = S_out[N - 1].view(B, H, Dk, Dv).clone()
        elif output_final_state:
            H0_docs = None if H0 is None else H0[docs.ids]
            # (documents, H, Dk, Dv)
            final = docs.per_document(_final_states(K, V, S_out, ends, H0_docs, R), H0)
        saved_final = final if docs is not None else None  # packed: dL/dB at each document's last token
        ctx.save_for_backward(Q, K, V, A, b, S0, S_out if ctx.kept_states else None, H0, saved_final)
        ctx.meta = (B, T, H, G, scale, q.dtype, k.dtype, v.dtype, Dv)
        ctx.row_sum = row_sum
        ctx.docs = docs
        out = _from_chunks(O, B, T, H, v.dtype)
        if not row_sum:
            return out, final, None
        # the output for a value of ones, from the same score blocks: intra-chunk row sums of A, plus q against
        # the decayed key sum z entering the chunk (z follows the state's recurrence with v = 1)
        z0 = Z0 = z_starts = None
        if key_sum0 is not None and docs is None:
            z0 = key_sum0.reshape(B * H, Dk, 1).to(acc)
        elif key_sum0 is not None:
            Z0 = key_sum0.to(acc)  # (documents, H, Dk, 1)
            z_starts = (ends.m, Z0[docs.ids] * ends.h0_out)
        z_out = _scan_states(K_end.sum(2)[..., None], d, z0, z_starts)  # (N, BH, Dk, 1)
        sums = A.sum(-1, keepdim=True)  # (N, BH, C, 1)
        _read_states(sums, Q_start, z_out, z0)
        if Z0 is not None:
            _read_initial_states(sums, Q, ends, Z0[docs.ids], scale, R)
        sums = _from_chunks(sums, B, T, H, v.dtype)[..., 0]  # (B, T, H)
        if output_final_state:
            if docs is None:
                z_final = z_out[N - 1].view(B, H, Dk, 1)
            else:
                Z0_docs = None if Z0 is None else Z0[docs.ids]
                z_final = docs.per_document(_final_states(K, None, z_out, ends, Z0_docs, R), Z0)
            final = torch.cat([final, z_final], dim=-1)
        ctx.mark_non_differentiable(sums)
        return out, final, sums

    @staticmethod
    def backward(ctx, d_out, d_final, _d_sums):
        with torch.autocast(d_out.device.type, enabled=False):
            return ChunkRetention._backward(ctx, d_out, d_final)

    @staticmethod
    def _backward(ctx, d_out, d_final):
        Q, K, V, A, b, S0, S_out, H0, final = ctx.saved_tensors
        B, T, H, G, scale, q_dtype, k_dtype, v_dtype, Dv = ctx.meta
        N, _, C, Dk = Q.shape
        BH, R = B * H, H // G
        docs = ctx.docs
        d = _Decays(b, scale, docs)
        dS = None if d_final is None else d_final[..., :Dv].to(Q.dtype)  # key sums: no grad
        if dS is not None and docs is None:
            dS = dS.reshape(BH, Dk, Dv)
        ends = H0_docs = dS_docs = starts = None
        if docs is not None and (H0 is not None or dS is not None):
            ends = _DocumentEnds(docs, b)
        if H0 is not None:
            H0_docs = H0[docs.ids]
            starts = (ends.m, H0_docs * ends.h0_out)
        if dS is not None and docs is not None:
            dS_docs = dS[docs.ids]  # (Dn, BH, Dk, Dv), B == 1
        K_end = _per_head(K, d.k, R)
        if S_out is None:
            S_out = _chunk_states(K_end, V, d, S0, starts)
        dO = _to_chunks(d_out, N, C, Q.dtype)

        # gradients of the state entering each chunk, scanned in place from the end:
        # Gin[n] = P[n] + exp(b_C of chunk n) Gin[n + 1], Gin[N] = dS_final; P[n] = chunk n's direct use
        Q_start = _per_head(Q, d.q, R)
        Gin = _bmm(Q_start.transpose(-1, -2), dO)  # (N, BH, Dk, Dv)
        del Q_start
        if dS is not None and docs is None:
            Gin[N - 1].addcmul_(dS, _at(d.chunk, N - 1))
        elif dS_docs is not None:  # a packed document's final state reads the state entering its last chunk
            Gin.index_add_(0, ends.n, dS_docs * ends.carried)
        for n in range(N - 2, -1, -1):
            Gin[n].addcmul_(Gin[n + 1], _at(d.chunk, n))
        # the gradient reaching the state *after* chunk n is Gin[n + 1] (dS_final after the last one)

        dP = _bmm(dO, V.transpose(-1, -2))  # (N, BH, C, C): dL/dA
        # grouped q, k: the gate gradient's share from the scores, from this per-head product (see the docstring)
        P = dP * A if R > 1 and ctx.needs_input_grad[3] else None
        dA = d.mask_(dP)
        if R == 1:
            dQ = _bmm(dA, K)
            dK = _bmm(dA.transpose(-1, -2), Q)
            dA_groups = None
        else:  # per head here only the terms through the states; the scores' part is added per group at the end
            dA_groups = _group_sum(dA, R)  # (N, BG, C, C)
            # set by the state terms below, except the first chunk's dQ and the last chunk's dK
            dQ = torch.empty(N, BH, C, Dk, dtype=Q.dtype, device=Q.device)
            dK = torch.empty_like(dQ)
            dQ[0].zero_()
            dK[N - 1].zero_()
        del dA
        dV = _bmm(A.transpose(-1, -2), dO)
        if N > 1:
            rest_q, head_k = _rows(d.q, 1, N), _rows(d.k, 0, N - 1)
            _add_product_(dQ[1:], _bmm(dO[1:], S_out[:-1].transpose(-1, -2)), rest_q, R == 1)
            _add_product_(dK[:-1], _bmm(V[:-1], Gin[1:].transpose(-1, -2)), head_k, R == 1)
            _baddbmm_(dV[:-1], K_end[:-1], Gin[1:])
        if S0 is not None:
            dQ[0].addcmul_(torch.bmm(dO[0], S0.transpose(-1, -2)), _at(d.q, 0))
        if dS is not None and docs is None:
            dK[N - 1].addcmul_(torch.bmm(V[N - 1], dS.transpose(-1, -2)), _at(d.k, N - 1))
            dV[N - 1].baddbmm_(K_end[N - 1], dS)
        del K_end
        if dS_docs is not None:
            _final_states_backward(dK, dV, K, V, dS_docs, ends, R)
        d_initial = Gin[0] if S0 is not None else None
        dH0 = None
        if H0 is not None:
            dH0 = _initial_states_backward(dQ, Q, dO, Gin, H0_docs, dS_docs, ends, scale, R)

        dg = None
        if ctx.needs_input_grad[3]:
            db = _dot_per_head(Q, dQ, R).sub_(_dot_per_head(K, dK, R))  # (N, BH, C): dL/dB_i
            if P is not None:
                db.add_(P.sum(-1)).sub_(P.sum(-2))
                del P
            if dS is not None and docs is None:
                db[-1, :, -1] += (dS * S_out[N - 1]).sum((-1, -2))
            db = db.view(N, B, H, C).permute(1, 0, 3, 2).reshape(B, N * C, H)
            # packed (B == 1): a document's final state is read at its last token, its initial state written at
            # the token before its first (the first document's before the sequence, where B is constant)
            if dS_docs is not None:
                db[0].index_add_(0, docs.last, (dS_docs * final[docs.ids, ..., :Dv]).sum((-1, -2)))
            if dH0 is not None:
                inside = docs.first > 0
                db[0].index_add_(0, docs.first[inside] - 1, -(dH0 * H0_docs).sum((-1, -2))[inside])
            dg = db.flip(1).cumsum(1).flip(1)[:, :T]  # dL/dg_t = sum over i >= t

        if d_initial is not None:
            d_initial = d_initial.view(B, H, Dk, Dv)
        elif dH0 is not None:  # an empty document's final state is its initial state
            d_initial = docs.per_document(dH0, dS)
        if d_initial is not None and ctx.row_sum:
            d_initial = F.pad(d_initial, (0, 1))
        if dA_groups is not None:  # q, k of a group: the sums over its heads, plus the shared scores' part
            dQ, dK = _group_sum(dQ, R), _group_sum(dK, R)
            _baddbmm_(dQ, dA_groups, K)
            _baddbmm_(dK, dA_groups.transpose(-1, -2), Q)
        return (
            _from_chunks(dQ, B, T, G, q_dtype),
            _from_chunks(dK, B, T, G, k_dtype),
            _from_chunks(dV, B, T, H, v_dtype),
            dg,
            d_initial,
            None,
            None,
            None,
            None,
            None,
        )


def _final_states_backward(dK, dV, K, V, dS: torch.Tensor, ends: _DocumentEnds, R: int) -> None:
    """dK, dV += the gradients of the packed documents' final states (dS, (Dn, BH, Dk, Dv)) through their tokens
    of the chunk each ends in (the path through the entering state is in Gin)."""
    for sl in ends.groups:
        n, w = ends.n[sl], ends.w_end[sl]
        dV.index_add_(0, n, _bmm(_per_head(K[n], w, R), dS[sl]))
        dK.index_add_(0, n, _bmm(V[n], dS[sl].transpose(-1, -2)).mul_(w))


def _initial_states_backward(
    dQ, Q, dO, Gin, H0, dS, ends: _DocumentEnds, scale: float, R: int
) -> torch.Tensor:
    """The gradients of the packed documents' initial states H0 (Dn, BH, Dk, Dv), and their part of dQ (in place):
    read by their tokens of the chunk each starts in, carried out of it, or reaching the final state."""
    parts = []
    for sl in ends.groups:
        m = ends.m[sl]
        w = ends.w_start[sl] * scale
        parts.append(_bmm(_per_head(Q[m], w, R).transpose(-1, -2), dO[m]))
        dQ.index_add_(0, m, _bmm(dO[m], H0[sl].transpose(-1, -2)).mul_(w))
    dH0 = torch.cat(parts)
    # the state leaving chunk m is the one entering chunk m + 1 (h0_out is 0 where the document ends in chunk m)
    N = Gin.shape[0]
    dH0.addcmul_(Gin[(ends.m + 1).clamp(max=N - 1)], ends.h0_out)
    if dS is not None:
        dH0.addcmul_(dS, ends.h0_end)
    return dH0


@torch.compiler.disable
def _apply(*args):
    """The op runs eagerly inside a ``torch.compile``d model (the graph breaks around it): tracing it would unroll
    its loops over chunks, which takes minutes to compile at long T and runs slower than the eager op."""
    return ChunkRetention.apply(*args)


def runs_grouped(q: torch.Tensor, v: torch.Tensor, cu_seqlens, row_sum: bool) -> bool:
    """Whether a call runs the grouped form (``grouped.py``: grouped q, k, one sequence per row, no row sums,
    T > 0), which also takes ``retention``'s ``v_scale`` and ``skip`` into its passes."""
    return q.shape[1] > 0 and q.shape[2] < v.shape[2] and cu_seqlens is None and not row_sum


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
    """Chunkwise retention. q, k (B, T, H, Dk) or grouped (B, T, G, Dk), G dividing H; v (B, T, H, Dv); g (B, T, H)
    log-gates; state (B, H, Dk, Dv).

    With ``row_sum``, also returns the row sums (B, T, H) without gradient, from the same score blocks, and
    the state has one more column (the decayed key sum): (out, state, row_sums). Packed sequences
    (``cu_seqlens``, B == 1) run in the same single pass over the chunks, masked per document; the initial and
    final states then have one row per document.
    """
    if q.shape[1] == 0:
        B, _, _, Dk = q.shape
        H = v.shape[2]
        rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        out = v.new_zeros(v.shape)
        state = None
        if output_final_state:
            acc = state_dtype(q.dtype)
            state = q.new_zeros(rows, H, Dk, v.shape[-1] + int(row_sum), dtype=acc)
            if initial_state is not None:
                state = initial_state.to(acc)
        return (out, state, q.new_zeros(B, 0, H, dtype=v.dtype)) if row_sum else (out, state)
    if runs_grouped(q, v, cu_seqlens, row_sum):
        # grouped q, k (Mamba-2's SSD): the state products run group-wide (``grouped.py``)
        from zoo.ops.retention.grouped import grouped_chunk_retention

        return grouped_chunk_retention(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    args = (q, k, v, g, initial_state, scale, chunk_size, output_final_state, row_sum, cu_seqlens)
    out, state, sums = _apply(*args)
    return (out, state, sums) if row_sum else (out, state)
