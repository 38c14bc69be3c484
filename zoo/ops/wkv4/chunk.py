"""Chunked RWKV-4 WKV in PyTorch: the CPU fast path and the fallback everywhere.

RWKV-4's WKV (Peng et al. 2023, arXiv:2305.13048; see ``naive.py``) is, per channel, a ratio of two decayed sums
of exponentials, carried as a state (a, b, p) meaning numerator a e^p and denominator b e^p. Every sum is formed
from terms whose exponents are written out exactly and shifted by their maximum before exponentiation, so that no
exponent is positive and nothing overflows in float32, however large the keys or strong the decay. The sequence
is cut into chunks of L tokens and the work is spread over them in three passes, none of them a loop over T:

1. Each chunk's contribution to the state at its end, (x, y, q): q = max_i (L - 1 - i) w + k_i and
   x, y = sum_i e^{(L - 1 - i) w + k_i - q} (v_i, 1), over the tokens of the document the chunk ends in.
2. The state leaving every chunk, by an inclusive scan over chunks: a chunk maps the state entering it to
   (state decayed by L w) merged with (x, y, q), or, where a document starts inside it and runs to its end, to
   that document's initial state decayed to the chunk's end merged with (x, y, q). These maps compose (decays
   add up; a reset absorbs what came before), so log2(T / L) Hillis-Steele steps over all chunks at once replace
   a loop over chunks.
3. Inside all chunks at once, the state entering each token from the state entering its chunk: its max by L steps
   over (R, N, C) tensors (max_{j+1} = max(max_j + w, k_j)), the two factors of every token's step in one pass,
   then numerator and denominator by L more steps; the outputs from them in one pass, out_j = (e^{p_j} a_j +
   e^{u + k_j} v_j) / (e^{p_j} b_j + e^{u + k_j}) with both weights divided by their sum. A token that starts a
   document reads its own initial state instead.

The backward is written out (``_ChunkWKV4``), saving the state entering every token and its step factors. The
adjoint of the state after each token, kept at the scale of its max (so bounded), runs back through every chunk by
mu_{j-1} = G_j + F1_j mu_j (G from token j's output, F1 <= 1 its decay factor): first from nothing after the chunk,
which gives each chunk's own part of the adjoint of the state entering it; a reverse scan over chunks (the same
Hillis-Steele steps, factors e^{L w + p_in - p_out} <= 1) adds what later chunks send back; a second walk through
the chunks from the adjoint leaving each gives every token's. dk, dv, du, dw and the initial state's gradient are
then closed forms of these adjoints and the forward's factors. The final state's max, where its gradient does not
only move the scale of (a, b), passes its gradient down the path of the running max (to the key that set it, to w
once per step it decayed, or to the initial max; ties split it evenly, as ``torch.maximum`` does). Exponentials
are computed through sigmoids of exponents floored far below resolution (``_step_factors``): one of every pair of
weights is 1, and on CPUs the sigmoid is several times faster than exp; the floor keeps weights normal floats.

The final state of each sequence is one step from the state entering its last token, its max the max of all its
exponents, which is exactly the max the recurrence tracks, so states round-trip with the recurrent form and with
transformers.

Work is O(T C) elementwise and memory a few times that of k. Batches and packed sequences run alike (see
``zoo.ops.gla.documents``): documents never see each other's tokens, and a document starting inside a chunk
reads its own initial state.
"""

from __future__ import annotations

import torch

from zoo.ops.gla.documents import Documents
from zoo.ops.wkv4.naive import empty_state, state_dtype


def _merge(a1, b1, p1, a2, b2, p2):
    """(a1 e^{p1} + a2 e^{p2}, b1 e^{p1} + b2 e^{p2}) as (a, b, p) with p the larger exponent."""
    p = torch.maximum(p1, p2)
    e1, e2 = _step_factors(p1 - p2)
    return a1 * e1 + a2 * e2, b1 * e1 + b2 * e2, p


def default_chunk_size(T: int) -> int:
    """Tokens per chunk of the CPU form, at most T: 16 (measured at C = 256, T = 2048 on a CPU: 8 and 32 are within
    15% of it; shorter chunks mean more steps of the scan over chunks, longer ones more steps inside them)."""
    return max(1, min(16, T))


def _scan_chunks(x, y, q, shift, reset):
    """Inclusive scan over the chunks (dim 1) of the chunk contributions (x, y, q) (R, N, C): element n becomes
    the state after chunk n, each earlier chunk decayed by the ``shift`` = L w exponent per chunk it crosses.
    ``reset`` (R, N) marks chunks whose state does not depend on the one entering them (a document starts in them
    and runs to their end): the scan stops there. Hillis-Steele steps: log2(N) elementwise passes instead of a
    loop over N."""
    N = x.shape[1]
    span = 1
    while span < N:
        xl, yl, ql = x[:, :-span], y[:, :-span], q[:, :-span] + span * shift
        xr, yr, qr = x[:, span:], y[:, span:], q[:, span:]
        xm, ym, qm = _merge(xl, yl, ql, xr, yr, qr)
        if reset is not None:
            keep = reset[:, span:, None]
            xm, ym, qm = (torch.where(keep, r, m) for r, m in ((xr, xm), (yr, ym), (qr, qm)))
            reset = torch.cat([reset[:, :span], reset[:, span:] | reset[:, :-span]], 1)
        x, y, q = (torch.cat([t[:, :span], m], 1) for t, m in ((x, xm), (y, ym), (q, qm)))
        span *= 2
    return x, y, q


def _suffix_scan(d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """s_n = d_n + c_n s_{n+1} over dim -2 (chunks), s past the last chunk 0: the adjoint of the state entering
    every chunk from the local ones ``d`` and the factors ``c`` (<= 1) that carry a chunk's exit adjoint to its
    entry. Hillis-Steele steps, as ``_scan_chunks`` in reverse."""
    N = d.shape[-2]
    span = 1
    while span < N:
        d = torch.cat(
            [torch.addcmul(d[..., :-span, :], c[..., :-span, :], d[..., span:, :]), d[..., -span:, :]], -2
        )
        if span * 2 < N:
            c = torch.cat([c[..., :-span, :] * c[..., span:, :], c[..., -span:, :]], -2)
        span *= 2
    return d


# Exponents below this are raised to it (e^-80 ~ 2e-35 in float32, e^-700 in float64): far below anything the sums
# can resolve next to their largest term (of weight 1), and it keeps the weights normal floats (arithmetic on
# subnormal floats is many times slower on x86 CPUs).
def _floor(x: torch.Tensor) -> float:
    return -700.0 if x.dtype == torch.float64 else -80.0


def _exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """e^max(x, floor) for x <= 0 as s / (1 - s), s = sigmoid(x): exact to rounding (1 - s >= 1/2), and several times
    cheaper than exp on CPUs where exp is not vectorised. Overwrites x."""
    s = torch.sigmoid(x.clamp_(min=_floor(x)))
    return s.div_(1 - s)


def _step_factors(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e^{min(d, 0)}, e^{min(-d, 0)}) (exponents floored): the factors of the two terms a, b of a merge
    e^a x + e^b y divided by e^{max(a, b)}, with d = a - b; from one sigmoid (one of them is 1). Overwrites d."""
    s = torch.sigmoid(d.clamp_(_floor(d), -_floor(d)))
    t = 1 - s
    inv = torch.reciprocal(torch.maximum(s, t))
    return s.mul_(inv), t.mul_(inv)


class _Layout:
    """Where documents start and end in the chunks, token-major: per token (L, R, N) for loops over the L tokens of
    every chunk at once."""

    def __init__(self, docs: Documents, T: int, cu_seqlens, h0_ext: torch.Tensor):
        self.docs, self.T = docs, T
        # every chunk holds one document's tokens only (a batch whose length is a multiple of L): no masks needed
        self.packed = cu_seqlens is not None
        self.plain = not self.packed and T % docs.L == 0
        self.doc = docs.doc.permute(2, 0, 1)  # (L, R, N)
        self.start = (docs.since_start == 0).permute(2, 0, 1)  # the token reads its document's initial state
        self.carried = docs.carried.permute(2, 0, 1)
        # the state after token j is the one entering token j + 1 (not so before a start, nor at a chunk's end)
        self.flows = torch.cat([~self.start[1:], self.start.new_zeros(1, *self.start.shape[1:])])
        self.last_doc = self.doc == self.doc[-1:]  # (L, R, N): tokens of the document a chunk ends in
        dtype = h0_ext.dtype
        # masks as numbers (multiplications are much cheaper than torch.where on a CPU)
        self.start_f = self.start[..., None].to(dtype)  # (L, R, N, 1)
        self.keep_f = 1 - self.start_f
        self.flows_f = self.flows[..., None].to(dtype)
        self.h0_tok = None if self.plain else h0_ext[self.doc].unbind(3)  # 3 x (L, R, N, C)

    def to_tokens(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """(B, T, C) -> (L, R, N, C), zero-padded."""
        return self.docs.chunks(x, dtype).permute(2, 0, 1, 3).contiguous()

    def from_tokens(self, x: torch.Tensor, B: int) -> torch.Tensor:
        """(L, R, N, C) -> (B, T, C), padding dropped."""
        return self.docs.unchunk(x.permute(1, 2, 0, 3), self.T).reshape(B, self.T, x.shape[-1])


def _forward(w, u, K, V, h0, h0_ext, lay: _Layout):
    """Outputs (L, R, N, C) and what the backward needs. K, V (L, R, N, C) in the state dtype."""
    docs, L = lay.docs, K.shape[0]
    pos = torch.arange(L, device=K.device)

    # 1. each chunk's part of the state at its end, for the document its last token belongs to
    F = torch.addcmul(K, (L - 1 - pos).to(K.dtype)[:, None, None, None], w)  # (L, R, N, C)
    mine = None if lay.plain else lay.last_doc[..., None].to(K.dtype)
    q = (F if mine is None else F - (1 - mine) * 1e30).amax(0)  # (R, N, C)
    P = _exp_nonpositive(F.sub_(q))
    if mine is not None:
        P = P * mine
    x, y = (P * V).sum(0), P.sum(0)

    # 2. the state leaving every chunk. A chunk in which a document starts and runs to its end leaves that
    # document's initial state, decayed from its first token to the chunk's end, merged with (x, y, q); every
    # other chunk the state entering it decayed by L w, merged with (x, y, q).
    last_h0 = h0_ext[docs.doc[..., -1]]  # (R, N, 3, C)
    last_h0_max = last_h0[:, :, 2] + (docs.since_start[..., -1] + 1).to(K.dtype)[..., None] * w
    reset = ~docs.carried[:, :, -1]  # (R, N)
    xs, ys, qs = _merge(last_h0[:, :, 0], last_h0[:, :, 1], last_h0_max, x, y, q)
    x, y, q = (torch.where(reset[..., None], s, c) for s, c in ((xs, x), (ys, y), (qs, q)))
    # chunk 0 always resets; in a batch without packing no other chunk does
    x, y, P_out = _scan_chunks(x, y, q, L * w, reset if lay.packed else None)
    A_in, B_in, P_in = (
        torch.cat([s.new_zeros(s.shape[0], 1, s.shape[2]), s[:, :-1]], 1) for s in (x, y, P_out)
    )

    # 3. inside every chunk at once, the state entering each token: its max by L steps over (R, N, C) tensors, the
    # factors of every token's step from it in one pass, then the numerator and denominator by L steps. A token
    # that starts a document reads its initial state instead.
    R, N, C = P_in.shape
    A, Bd, PE = (K.new_empty(L, R, N, C) for _ in range(3))  # numerator, denominator (divided by e^PE), max
    if lay.plain:  # only the first token of chunk 0 starts a document
        for dst, first, rest in ((A, h0[:, 0], A_in), (Bd, h0[:, 1], B_in), (PE, h0[:, 2], P_in)):
            dst[0, :, 0], dst[0, :, 1:] = first, rest[:, 1:]
        for j in range(1, L):
            torch.maximum(PE[j - 1] + w, K[j - 1], out=PE[j])
    else:
        h0a, h0b, h0p = lay.h0_tok
        keep, start = lay.keep_f, lay.start_f
        for dst, rest, init in ((A, A_in, h0a), (Bd, B_in, h0b), (PE, P_in, h0p)):
            torch.addcmul(init[0] * start[0], rest, keep[0], out=dst[0])
        for j in range(1, L):
            pe = torch.maximum(PE[j - 1] + w, K[j - 1]).mul_(keep[j])
            torch.addcmul(pe, h0p[j], start[j], out=PE[j])
    # every token's step: max_{j+1} = max(PE_j + w, k_j), state = F1 state_j + F2 (v_j, 1)
    F1, F2 = _step_factors((PE + w).sub_(K))
    if L > 1:
        C1, InA, InB = F1[:-1], F2[:-1] * V[:-1], F2[:-1]
        if not lay.plain:
            keep, start = lay.keep_f[1:], lay.start_f[1:]
            C1 = C1 * keep
            InA = torch.addcmul(InA * keep, lay.h0_tok[0][1:], start)
            InB = torch.addcmul(InB * keep, lay.h0_tok[1][1:], start)
        for j in range(1, L):
            torch.addcmul(InA[j - 1], C1[j - 1], A[j - 1], out=A[j])
            torch.addcmul(InB[j - 1], C1[j - 1], Bd[j - 1], out=Bd[j])
    # outputs: (e^{PE} A + e^{u + k} v) / (e^{PE} B + e^{u + k}) with both weights divided by their sum
    alpha = torch.sigmoid((PE - u).sub_(K).clamp_(_floor(K), -_floor(K)))
    beta = 1 - alpha
    inv = torch.reciprocal(torch.addcmul(beta, alpha, Bd))
    r1, r2 = alpha.mul_(inv), beta.mul_(inv)  # d out / d numerator, d out / d v (scaled units)
    out = torch.addcmul(r1 * A, r2, V)
    return out, (A, Bd, PE, F1, F2, r1, r2, P_in, P_out)


def _final_states(lay: _Layout, w, K, V, h0, A, Bd, PE, F1, F2) -> torch.Tensor:
    """The state after each sequence's last token, (D, 3, C): one step from the state entering it. Empty sequences
    pass their initial state on."""
    row, n, o = lay.docs.ends()  # (Dn,)
    ids = lay.docs.ids
    # the recurrence's max: the largest exponent of the sums
    pq = torch.maximum(PE[o, row, n] + w, K[o, row, n])
    f1, f2 = F1[o, row, n], F2[o, row, n]
    a = torch.addcmul(f2 * V[o, row, n], f1, A[o, row, n])
    b = torch.addcmul(f2, f1, Bd[o, row, n])
    states = torch.stack([a, b, pq], 1)  # (Dn, 3, C)
    return h0.index_put((ids,), states) if ids.numel() else h0.clone()


class _ChunkWKV4(torch.autograd.Function):
    """The chunked form with its backward written out: the gradients inside every chunk from the state entering it
    (a reverse loop over the L tokens of all chunks at once), the adjoint of the state entering every chunk by a
    reverse scan over chunks, and dw, du, dk, dv, d initial state in closed form from them, every exponent shifted
    by a max of the forward so that nothing overflows."""

    @staticmethod
    def forward(ctx, w, u, k, v, h0, cu_seqlens, L, output_final_state):
        B, T, C = k.shape
        acc = state_dtype(k.dtype)
        rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        given_h0 = h0 is not None
        ctx.dtypes = (w.dtype, u.dtype, k.dtype, v.dtype, h0.dtype if given_h0 else None)
        h0 = empty_state(rows, C, acc, k.device) if h0 is None else h0.to(acc)
        docs = Documents(B, T, cu_seqlens, L, k.device)
        h0_ext = torch.cat([h0, empty_state(1, C, acc, k.device)])
        lay = _Layout(docs, T, cu_seqlens, h0_ext)
        wa, ua = w.to(acc), u.to(acc)
        K, V = lay.to_tokens(k, acc), lay.to_tokens(v, acc)
        out, saved = _forward(wa, ua, K, V, h0, h0_ext, lay)
        A, Bd, PE, F1, F2 = saved[:5]
        final = _final_states(lay, wa, K, V, h0, A, Bd, PE, F1, F2) if output_final_state else None
        ctx.lay, ctx.B, ctx.given_h0 = lay, B, given_h0
        ctx.save_for_backward(wa, K, V, h0, out, *saved, final)
        return lay.from_tokens(out, B).to(v.dtype), final

    @staticmethod
    def backward(ctx, g_out, g_final):
        w, K, V, h0, out, A, Bd, PE, F1, F2, r1, r2, P_in, P_out, final = ctx.saved_tensors
        lay: _Layout = ctx.lay
        docs = lay.docs
        L, R, N, C = K.shape
        acc = K.dtype
        g = lay.to_tokens(g_out, acc) if g_out is not None else K.new_zeros(K.shape)
        # d loss / d (numerator, -denominator) entering each token, from its output (scaled units)
        Ga = g * r1
        Gb = Ga * out
        G2 = g * r2
        # the final states' gradient: (a, b) at the scale of their max is the adjoint of the state after the last
        # token; its max gets what remains of its gradient (the max moves the scale of a and b) down the path of
        # the running max (``_max_path``)
        fin = None
        if g_final is not None and final is not None:
            row, n, o = docs.ends()
            ids = docs.ids
            gf = g_final.to(acc)
            fin = (o, row, n, gf[ids, 0], -gf[ids, 1], gf[ids, 2] - (gf[ids, :2] * final[ids, :2]).sum(1))
        # The adjoint mu_j of the state after token j (scale: its max) runs back through the chunk:
        # mu_{j-1} = flows_{j-1} (G_j + F1_j mu_j) + fin_{j-1}. In a plain batch every state flows into the next
        # token and a final state can only be the last token's.
        if lay.plain:
            Xa, Xb, Y = Ga[1:], Gb[1:], F1[1:]
        else:
            fl = lay.flows_f[:-1]
            Xa, Xb, Y = Ga[1:] * fl, Gb[1:] * fl, F1[1:] * fl
            if fin is not None:
                Xa, Xb = Xa.clone(), Xb.clone()
                inner = o < L - 1
                Xa[o[inner], row[inner], n[inner]] += fin[3][inner]
                Xb[o[inner], row[inner], n[inner]] += fin[4][inner]
        last_a, last_b = K.new_zeros(R, N, C), K.new_zeros(R, N, C)  # fin at the chunks' last tokens
        if fin is not None:
            at_end = o == L - 1
            last_a[row[at_end], n[at_end]] = fin[3][at_end]
            last_b[row[at_end], n[at_end]] = fin[4][at_end]

        def walk(mu_a, mu_b, Ma=None, Mb=None):
            """Back through the L tokens from the adjoint after the last one; returns the adjoint entering token 0
            (and fills Ma, Mb with every token's mu when given)."""
            if Ma is not None:
                Ma[L - 1], Mb[L - 1] = mu_a, mu_b
            for j in range(L - 1, 0, -1):
                mu_a = torch.addcmul(Xa[j - 1], Y[j - 1], mu_a, out=None if Ma is None else Ma[j - 1])
                mu_b = torch.addcmul(Xb[j - 1], Y[j - 1], mu_b, out=None if Mb is None else Mb[j - 1])
            return torch.addcmul(Ga[0], F1[0], mu_a), torch.addcmul(Gb[0], F1[0], mu_b)

        # 1. locally (nothing after the chunk): the adjoint of the state entering each chunk from its own tokens
        ea, eb = walk(last_a, last_b)
        carried0 = lay.carried[0][..., None].to(acc)  # (R, N, 1)
        d = torch.stack([ea, eb]) * carried0  # (2, R, N, C)
        # 2. the adjoint of the state entering every chunk, then of the one leaving it (scale P_out)
        through = lay.carried[-1][..., None]  # the state leaving the chunk depends on the one entering it
        c = _exp_nonpositive(L * w + P_in - P_out) * through.to(acc)
        lam = _suffix_scan(d, c)
        lam_exit = torch.cat([lam[:, :, 1:], lam.new_zeros(2, R, 1, C)], 2)  # (2, R, N, C)
        # 3. again through every chunk, now from the adjoint leaving it, keeping every token's
        PQ_last = torch.maximum(PE[-1] + w, K[-1])
        to_last = _exp_nonpositive(PQ_last - P_out)
        if not lay.plain:  # the last token's state leaves the chunk only if its document runs on
            to_last = to_last * (lay.doc[-1] < docs.D)[..., None].to(acc)
        Ma, Mb = K.new_empty(L, R, N, C), K.new_empty(L, R, N, C)
        walk(torch.addcmul(last_a, to_last, lam_exit[0]), torch.addcmul(last_b, to_last, lam_exit[1]), Ma, Mb)
        # 4. the gradients. Mb is d loss / d (-denominator).
        vo = G2 * (V - out)
        dv = torch.addcmul(G2, F2, Ma)
        dk = torch.addcmul(vo, F2, torch.addcmul(-Mb, V, Ma))
        du = vo.sum((0, 1, 2))
        dw = (F1 * torch.addcmul(-Bd * Mb, A, Ma)).sum((0, 1, 2))
        # the initial states: read by the token starting each document
        dh0 = torch.zeros_like(h0) if ctx.given_h0 else None
        if dh0 is not None and docs.ids.numel():
            ids = docs.ids
            first = docs.first[ids]
            sj, srow, sn = first % L, docs.row[ids], first // L
            f1 = F1[sj, srow, sn]
            ea = torch.addcmul(Ga[sj, srow, sn], f1, Ma[sj, srow, sn])
            eb = -torch.addcmul(Gb[sj, srow, sn], f1, Mb[sj, srow, sn])
            dp = ea * A[sj, srow, sn] + eb * Bd[sj, srow, sn]
            dh0[ids] = torch.stack([ea, eb, dp], 1)
        if fin is not None:
            pi = _max_path(lay, w, K, PE, (o, row, n, None, fin[5]), P_in, P_out)
            if pi is not None:
                dk_pi, dw_pi, dh0_pi = pi
                dk = dk + dk_pi
                dw = dw + dw_pi
                if dh0 is not None and docs.ids.numel():
                    dh0[docs.ids, 2] += dh0_pi
        if dh0 is not None and g_final is not None and docs.empty.numel():
            dh0[docs.empty] = g_final.to(acc)[docs.empty]
        B = ctx.B
        wd, ud, kd, vd, hd = ctx.dtypes
        return (
            dw.to(wd),
            du.to(ud),
            lay.from_tokens(dk, B).to(kd),
            lay.from_tokens(dv, B).to(vd),
            None if dh0 is None else dh0.to(hd),
            None,
            None,
            None,
        )


def _max_path(lay: _Layout, w, K, PE, fin, P_in, P_out):
    """The gradient of the final states' max (what of it does not move a and b) down the path of the running max
    max_t = max(max_{t-1} + w, k_t): to the key that set it, to w once per step it decayed, or to the initial max.
    Ties split it evenly, as torch.maximum does. Returns (dk, dw, dh0 max of the non-empty sequences) or None."""
    o, row, n, _, gp = fin
    if not bool((gp != 0).any()):
        return None
    docs = lay.docs
    L, R, N, C = K.shape
    cand = PE + w
    kw = (K > cand).to(K.dtype) + 0.5 * (K == cand).to(K.dtype)  # the key sets the max after the token
    nkw = 1 - kw
    flows = lay.flows[..., None]
    pin = torch.zeros_like(K)
    pin[o, row, n] += gp
    # the max's adjoint at the state entering each token, locally
    Pe = K.new_empty(L, R, N, C)
    Pe[L - 1] = nkw[L - 1] * pin[L - 1]
    step, inj = nkw * flows, nkw * pin
    for j in range(L - 2, -1, -1):
        torch.addcmul(inj[j], step[j], Pe[j + 1], out=Pe[j])
    d = Pe[0] * lay.carried[0][..., None]
    through = lay.carried[-1][..., None]
    c = torch.where(through, nkw.prod(0), 0.0)
    lam = _suffix_scan(d, c)
    lam_exit = torch.cat([lam[:, 1:], lam.new_zeros(R, 1, C)], 1)
    # from the chunk's exit to the state after token j: through the tokens after j, none of which set the max
    after = torch.cat(
        [torch.flip(torch.cumprod(torch.flip(nkw[1:], (0,)), 0), (0,)), torch.ones_like(nkw[:1])]
    )
    reach = after * lam_exit
    if not lay.plain:
        reach = torch.where(lay.last_doc[..., None], reach, 0.0)
    Pi = reach + pin
    Pi[:-1] += Pe[1:] * flows[:-1]
    dk = kw * Pi
    dw = (nkw * Pi).sum((0, 1, 2))
    ids = docs.ids
    first = docs.first[ids]
    sj, srow, sn = first % L, docs.row[ids], first // L
    dh0 = nkw[sj, srow, sn] * Pi[sj, srow, sn]
    return dk, dw, dh0


# eager inside a torch.compile'd model (the graph breaks around it): the packed-document layout reads
# data-dependent sizes (nonzero)
@torch.compiler.disable
def chunk_wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked WKV. k, v (B, T, C); w, u (C,); states (B, 3, C), or one per packed sequence (``cu_seqlens``)."""
    B, T, C = k.shape
    if T == 0:
        acc = state_dtype(k.dtype)
        rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        h0 = empty_state(rows, C, acc, k.device) if initial_state is None else initial_state.to(acc)
        return v.new_zeros(v.shape), (h0.clone() if output_final_state else None)
    L = min(chunk_size or default_chunk_size(T), T)
    out, final = _ChunkWKV4.apply(w, u, k, v, initial_state, cu_seqlens, L, output_final_state)
    return out, final
