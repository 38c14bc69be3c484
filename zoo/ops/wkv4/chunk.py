"""Chunked RWKV-4 WKV in PyTorch: the CPU fast path and the fallback everywhere.

RWKV-4's WKV (Peng et al. 2023, arXiv:2305.13048; see ``naive.py``) is, per channel, a ratio of two decayed sums
of exponentials. The sequence is cut into chunks of L tokens; every quantity is a sum of terms e^{x} y whose
exponents x are written out exactly (never as a product of a growing and a shrinking factor) and shifted by their
own maximum before exponentiation, so that no exponent is positive and nothing overflows in float32, however large
the keys or strong the decay:

1. Inside a chunk, token j reads token i <= j with exponent E[j, i] = (j - 1 - i) w + k_i (i < j) or u + k_j
   (i = j): an (L, L) matrix per channel, masked to the token's own document.
2. Each chunk's contribution to the state at its end is (x, y, q): q = max_i (L - 1 - i) w + k_i and
   x, y = sum_i e^{(L - 1 - i) w + k_i - q} (v_i, 1), over the tokens of the document the chunk ends in.
3. A scan over chunks (a loop over T / L chunks, not over tokens) carries the state (a, b, p) entering each chunk,
   meaning numerator a e^p and denominator b e^p: entering chunk n + 1 it is the max-shifted sum of the state
   entering chunk n decayed by L w (or, where a document starts inside chunk n, that document's initial state)
   and of (x, y, q).
4. Token j's output adds the state column, exponent p + j w with weights (a, b), to row j of E; each row is
   shifted by its own max M_j (detached: the ratio does not depend on it) and
   wkv_j = (sum_i e^{E[j, i] - M_j} v_i + e^{p + j w - M_j} a) / (sum_i e^{E[j, i] - M_j} + e^{p + j w - M_j} b).

The final state of each sequence is the row "before the token after its last one" (no bonus), with its max the
max of all its exponents, which is exactly the max the recurrence tracks (``max_t = max(max_{t-1} + w, k_t)``
unrolled), so states round-trip with the recurrent form and with transformers. Gradients come from autograd.

Work and memory are O(T L C) (the (L, L) matrix per channel is elementwise, not a matmul: the decay is per
channel); the default L = 16 keeps that a few times the size of k. Batches and packed sequences run alike (see
``zoo.ops.gla.documents``): documents never see each other's tokens, and a document starting inside a chunk
reads its own initial state, decayed from its first token.
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


# eager inside a torch.compile'd model (the graph breaks around it): the packed-document layout reads
# data-dependent sizes (nonzero), and tracing would unroll the loop over chunks
@torch.compiler.disable
def chunk_wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked WKV. k, v (B, T, C); w, u (C,); states (B, 3, C), or one per packed sequence (``cu_seqlens``)."""
    B, T, C = k.shape
    acc = state_dtype(k.dtype)
    rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = empty_state(rows, C, acc, k.device) if initial_state is None else initial_state.to(acc)
    if T == 0:
        return v.new_zeros(v.shape), (h0.clone() if output_final_state else None)
    L = min(chunk_size, T)
    docs = Documents(B, T, cu_seqlens, L, k.device)
    R, N = docs.R, docs.N
    w, u = w.to(acc), u.to(acc)
    K, V = docs.chunks(k, acc), docs.chunks(v, acc)  # (R, N, L, C)
    # the padding tokens' dummy document reads the empty state
    h0_ext = torch.cat([h0, empty_state(1, C, acc, k.device)])
    pos = torch.arange(L, device=k.device)
    ahead = (pos[:, None] - 1 - pos[None, :]).to(acc)  # (L, L): j - 1 - i
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=k.device)

    # 1. exponents inside the chunks, (R, N, L, L, C): row j (reader) x column i (read)
    E = ahead[..., None] * w + K[:, :, None]
    E = torch.where(torch.eye(L, dtype=torch.bool, device=k.device)[..., None], u + K[:, :, :, None], E)
    same_doc = docs.doc[..., :, None] == docs.doc[..., None, :]  # (R, N, L, L)
    visible = (pos[None, :] <= pos[:, None]) & same_doc
    E = torch.where(visible[..., None], E, neg_inf)

    # 2. each chunk's part of the state at its end, for the document its last token belongs to
    F = (L - 1 - pos).to(acc)[:, None] * w + K  # (R, N, L, C)
    F = torch.where((docs.doc == docs.doc[..., -1:])[..., None], F, neg_inf)
    q = F.amax(2)  # (R, N, C)
    P = torch.exp(F - q[:, :, None])
    x, y = (P * V).sum(2), P.sum(2)

    # 3. the state entering each chunk. A document that starts inside chunk n and runs past its end enters with
    # its initial state decayed from its first token to the chunk's end.
    last_doc = docs.doc[..., -1]  # (R, N)
    last_h0 = h0_ext[last_doc]  # (R, N, 3, C)
    last_h0_max = last_h0[:, :, 2] + (docs.since_start[..., -1] + 1).to(acc)[..., None] * w
    a, b, p = (h0.new_zeros(R, C) for _ in range(3))
    entering = [(a, b, p)]
    for n in range(N - 1):
        carry = docs.carried[:, n, -1, None]  # (R, 1)
        a_in = torch.where(carry, a, last_h0[:, n, 0])
        b_in = torch.where(carry, b, last_h0[:, n, 1])
        p_in = torch.where(carry, p + L * w, last_h0_max[:, n])
        a, b, p = _merge(a_in, b_in, p_in, x[:, n], y[:, n], q[:, n])
        entering.append((a, b, p))
    A_in, B_in, P_in = (torch.stack(s, 1) for s in zip(*entering))  # (R, N, C)

    # 4. outputs: the state column of each token, its own document's (carried in, or its initial state)
    h0_tok = h0_ext[docs.doc]  # (R, N, L, 3, C)
    carried = docs.carried[..., None]
    S_a = torch.where(carried, A_in[:, :, None], h0_tok[..., 0, :])
    S_b = torch.where(carried, B_in[:, :, None], h0_tok[..., 1, :])
    S_p = torch.where(
        carried,
        P_in[:, :, None] + pos.to(acc)[:, None] * w,
        h0_tok[..., 2, :] + docs.since_start.to(acc)[..., None] * w,
    )  # (R, N, L, C)
    M = torch.maximum(E.amax(3), S_p).detach()
    P = torch.exp(E - M[:, :, :, None])
    S_e = torch.exp(S_p - M)
    num = (P * V[:, :, None]).sum(3) + S_e * S_a
    den = P.sum(3) + S_e * S_b
    out = docs.unchunk(num / den, T).reshape(B, T, C).to(v.dtype)
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
