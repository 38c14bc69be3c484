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
3. Inside all chunks at once, the recurrence of ``naive.py`` token by token from the state entering the chunk
   (L steps over (rows, chunks, C) tensors): out_j = (e^{p - m} a + e^{u + k_j - m} v_j) / (e^{p - m} b +
   e^{u + k_j - m}) with m the larger exponent, then the state takes token j in with its decay. A token that
   starts a document reads its own initial state instead.

The maxima only keep the exponents <= 0; the values do not depend on them, so they are detached (their gradient
would cancel). Gradients come from autograd. The final state of each sequence is its tokens of the chunk it ends
in merged with the state entering that chunk, with its max the max of all its exponents, which is exactly the max
the recurrence tracks (``max_t = max(max_{t-1} + w, k_t)`` unrolled), so states round-trip with the recurrent form
and with transformers.

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
    e1, e2 = torch.exp(p1 - p), torch.exp(p2 - p)
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
    acc = state_dtype(k.dtype)
    rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = empty_state(rows, C, acc, k.device) if initial_state is None else initial_state.to(acc)
    if T == 0:
        return v.new_zeros(v.shape), (h0.clone() if output_final_state else None)
    L = min(chunk_size or default_chunk_size(T), T)
    docs = Documents(B, T, cu_seqlens, L, k.device)
    R = docs.R
    # every chunk holds one document's tokens only (a batch whose length is a multiple of L): no masks needed
    plain = cu_seqlens is None and T % L == 0
    w, u = w.to(acc), u.to(acc)
    K, V = docs.chunks(k, acc), docs.chunks(v, acc)  # (R, N, L, C)
    # the padding tokens' dummy document reads the empty state
    h0_ext = torch.cat([h0, empty_state(1, C, acc, k.device)])
    pos = torch.arange(L, device=k.device)
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=k.device)

    # 1. each chunk's part of the state at its end, for the document its last token belongs to
    F = (L - 1 - pos).to(acc)[:, None] * w + K  # (R, N, L, C)
    if not plain:
        F = torch.where((docs.doc == docs.doc[..., -1:])[..., None], F, neg_inf)
    q = F.amax(2)  # (R, N, C)
    P = torch.exp(F - q[:, :, None])
    x, y = (P * V).sum(2), P.sum(2)

    # 2. the state leaving every chunk. A chunk in which a document starts and runs to its end leaves that
    # document's initial state, decayed from its first token to the chunk's end, merged with (x, y, q); every
    # other chunk the state entering it decayed by L w, merged with (x, y, q).
    last_doc = docs.doc[..., -1]  # (R, N)
    last_h0 = h0_ext[last_doc]  # (R, N, 3, C)
    last_h0_max = last_h0[:, :, 2] + (docs.since_start[..., -1] + 1).to(acc)[..., None] * w
    reset = ~docs.carried[:, :, -1]  # (R, N)
    xs, ys, qs = _merge(last_h0[:, :, 0], last_h0[:, :, 1], last_h0_max, x, y, q)
    x, y, q = (torch.where(reset[..., None], s, c) for s, c in ((xs, x), (ys, y), (qs, q)))
    # chunk 0 always resets; in a batch without packing no other chunk does
    x, y, q = _scan_chunks(x, y, q, L * w, None if cu_seqlens is None else reset)
    zero = x.new_zeros(R, 1, C)  # what enters chunk 0 is never read (its tokens' document starts there)
    A_in, B_in, P_in = (torch.cat([zero, s[:, :-1]], 1) for s in (x, y, q))  # (R, N, C)

    # 3. outputs: inside every chunk at once, the recurrence token by token from the state entering the chunk
    # (L steps over (R, N, C) tensors). A token that starts a document reads its initial state instead.
    if plain:  # only the first token of chunk 0 starts a document
        aa, bb, pp = (torch.cat([h0[:, None, i], s[:, 1:]], 1) for i, s in enumerate((A_in, B_in, P_in)))
    else:
        aa, bb, pp = A_in, B_in, P_in
        h0_tok = h0_ext[docs.doc]  # (R, N, L, 3, C)
        starts = (docs.since_start == 0)[..., None]  # (R, N, L, 1)
    # (unbound once: indexing inside the loop would make the backward fill a zero tensor of K's size per token)
    keys, values = K.unbind(2), V.unbind(2)
    if not plain:
        starts, h0_tok = starts.unbind(2), [x.unbind(2) for x in h0_tok.unbind(3)]
    outs = []
    for j in range(L):
        kj, vj = keys[j], values[j]
        if not plain:
            aa, bb, pp = (torch.where(starts[j], h0_tok[i][j], t) for i, t in enumerate((aa, bb, pp)))
        # the maxima only keep the exponents <= 0: the values do not depend on them (detached)
        ww = u + kj
        p = torch.maximum(pp, ww).detach()
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        outs.append((e1 * aa + e2 * vj) / (e1 * bb + e2))
        if j + 1 < L:
            ww = pp + w
            p = torch.maximum(ww, kj).detach()
            e1, e2 = torch.exp(ww - p), torch.exp(kj - p)
            aa, bb, pp = e1 * aa + e2 * vj, e1 * bb + e2, p
    out = docs.unchunk(torch.stack(outs, 2), T).reshape(B, T, C).to(v.dtype)
    if not output_final_state:
        return out, None
    return out, _final_states(docs, w, K, V, h0, h0_ext, A_in, B_in, P_in, pos, acc)


def _final_states(docs: Documents, w, K, V, h0, h0_ext, A_in, B_in, P_in, pos, acc) -> torch.Tensor:
    """The state after each sequence's last token, (D, 3, C): from its tokens of the chunk it ends in and the state
    entering that chunk (or its initial state, if it starts there). Empty sequences pass their initial state on."""
    row, n, o = docs.ends()  # (Dn,)
    ids = docs.ids
    Kd, Vd = K[row, n], V[row, n]  # (Dn, L, C)
    mine = (docs.doc[row, n] == ids[:, None]) & (pos[None, :] <= o[:, None])  # (Dn, L)
    G = (o[:, None] - pos[None, :]).to(acc)[..., None] * w + Kd
    G = torch.where(mine[..., None], G, float("-inf"))
    carried = docs.carried[row, n, o][:, None]  # (Dn, 1)
    h0_d = h0_ext[ids]
    S_a = torch.where(carried, A_in[row, n], h0_d[:, 0])
    S_b = torch.where(carried, B_in[row, n], h0_d[:, 1])
    S_p = torch.where(
        carried,
        P_in[row, n] + (o + 1).to(acc)[:, None] * w,
        h0_d[:, 2] + (docs.since_start[row, n, o] + 1).to(acc)[:, None] * w,
    )
    mx = torch.maximum(G.amax(1), S_p)  # the recurrence's max: the largest exponent of the sums
    P = torch.exp(G - mx[:, None])
    S_e = torch.exp(S_p - mx)
    states = torch.stack([(P * Vd).sum(1) + S_e * S_a, P.sum(1) + S_e * S_b, mx], 1)  # (Dn, 3, C)
    # rows of non-empty sequences replaced (out of place, so that autograd sees it); empty ones keep their own
    return h0.index_put((ids,), states) if ids.numel() else h0.clone()
