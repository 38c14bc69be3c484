"""Chunked vector-decay linear attention in PyTorch: the CPU fast path and the fallback everywhere.

The recurrence (GLA, Yang et al. 2023, arXiv:2312.06635; RWKV-6, Peng et al. 2024, arXiv:2404.05892; see
``naive.py``) unrolled over a chunk of L tokens, with b_t the cumulative log-decay inside the chunk (b_t =
g_1 + ... + g_t, <= 0 and decreasing) and c_t the query-side one (c_t = b_t for GLA, which reads S_t; c_t = b_{t-1}
with b_0 = 0 for RWKV-6, which reads S_{t-1}):

    o_i / scale = sum_{j<i} (q_i * e^{c_i - b_j}) . k_j v_j + (q_i * d) . k_i v_i + (q_i * e^{c_i}) S_in

with d = 1 (GLA) or u (RWKV-6), and the state leaving the chunk S_out = e^{b_L} S_in + sum_j (k_j * e^{b_L - b_j}) v_j^T.
One implementation serves both (and any member of the family that differs only in where the query reads).

Every exponent is a difference c_i - b_j with j before i, so <= 0: nothing can overflow. Written as a matmul,
though, e^{c_i - b_j} must be split into a query and a key factor, e^{c_i - r} e^{r - b_j}, and both stay <= 1 only
for a reference point r between j and i. Hence the secondary chunking of GLA (section 4.2): the chunk is cut into
sub-chunks of s tokens (s = 16, or the largest divisor of L below it);

- for sub-chunk a and every earlier token j, the reference is r_a = b at the token before the sub-chunk, so
  q~_i = q_i e^{c_i - r_a} and k~_j = k_j e^{r_a - b_j} are both <= 1, and the block is one matmul q~ k~^T (keys
  at or after the sub-chunk's start are masked to 0 before their exponential is taken);
- inside a sub-chunk every exponent c_i - b_j lies within the sub-chunk's decay span (from b before its first
  token down to b at its last). Split at the middle m of that span, q_i e^{c_i - m} and k_j e^{m - b_j} are both
  within e^{+-span / 2}: the block is again one matmul, whose entries above the diagonal (which may overflow) are
  dropped. Where some span exceeds 2 * ``MAX_HALF_SPAN`` (decays so strong that a factor could leave float32's
  range), the (s, s, K) exponents are taken elementwise instead, each <= 0 as it is (several times slower).

The states are then scanned across chunks (a loop over T / L chunks, not over tokens). Gradients come from
autograd. Batches and packed sequences run alike in one pass (see ``documents.py``): scores between different
documents are masked, a token reads the carried state only when its document started before its chunk, and a
document starting inside a chunk reads its own initial state, decayed from its first token.
"""

from __future__ import annotations

import torch

from zoo.ops.gla.documents import Documents
from zoo.ops.gla.naive import state_dtype

# the largest exponent (in magnitude) of either factor of a split decay inside a sub-chunk: e^60 ~ 1e26 leaves
# float32 room for the keys and queries it multiplies
MAX_HALF_SPAN = 60.0


def sub_chunk_size(L: int, at_most: int = 16) -> int:
    """The largest divisor of the chunk length L that is <= ``at_most``."""
    return max(s for s in range(1, min(L, at_most) + 1) if L % s == 0)


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (..., H, L, K) at one token per leading index (index (...,)): (..., H, K)."""
    idx = index[..., None, None, None].expand(*index.shape, x.shape[-3], 1, x.shape[-1])
    return torch.take_along_dim(x, idx, dim=-2)[..., 0, :]


def _intra_chunk_scores(Q, K, b, c, bonus, s: int) -> torch.Tensor:
    """The decayed scores q_i . (e^{c_i - b_j} k_j) for j < i, and q_i . (bonus k_i) on the diagonal:
    (R, N, H, L, L), in sub-chunks of s tokens (module docstring)."""
    R, N, H, L, Dk = Q.shape
    S = L // s
    neg_inf = torch.tensor(float("-inf"), dtype=Q.dtype, device=Q.device)
    pos = torch.arange(L, device=Q.device)
    # 1. blocks below the diagonal: reference r_a = b at the token before sub-chunk a (0 before the chunk)
    b_before = torch.cat([torch.zeros_like(b[..., :1, :]), b], dim=-2)  # (R, N, H, L + 1, K): b_{t-1}
    r = b_before[..., 0:L:s, :]  # (R, N, H, S, K)
    Qr = Q.view(R, N, H, S, s, Dk) * torch.exp(c.view(R, N, H, S, s, Dk) - r[..., None, :])
    earlier = (pos[None, :] < pos[0:L:s, None])[..., None]  # (S, L, 1): token j before sub-chunk a
    Kr = K[..., None, :, :] * torch.exp(torch.where(earlier, r[..., None, :] - b[..., None, :, :], neg_inf))
    A = (Qr @ Kr.transpose(-1, -2)).view(R, N, H, L, L)  # (R, N, H, S, s, L) -> rows of the chunk
    # 2. inside each sub-chunk, strictly below the diagonal
    Qs, Ks, bs, cs = (x.view(R, N, H, S, s, Dk) for x in (Q, K, b, c))
    below = torch.ones(s, s, dtype=torch.bool, device=Q.device).tril(-1)
    # every exponent c_i - b_j of a sub-chunk lies within its decay span: from b before its first token to b at
    # its last. Split at the middle of that span, both factors stay within e^{+-span / 2}: one matmul, when no
    # span exceeds 2 * MAX_HALF_SPAN (no factor overflows, none underflows)
    top, bottom = b_before[..., 0:L:s, :], bs[..., -1, :]  # (R, N, H, S, K)
    if bool((top - bottom <= 2 * MAX_HALF_SPAN).all()):
        mid = ((top + bottom) / 2)[..., None, :]
        Qm, Km = Qs * torch.exp(cs - mid), Ks * torch.exp(mid - bs)
        # products above the diagonal may overflow: they are dropped (where, not a product with 0)
        blocks = torch.where(below, Qm @ Km.transpose(-1, -2), 0.0)  # (R, N, H, S, s, s)
    else:  # elementwise, each exponent <= 0 as it is
        below = below[..., None]
        # (R, N, H, S, s, s, K)
        decay = torch.exp(torch.where(below, cs[..., :, None, :] - bs[..., None, :, :], neg_inf))
        blocks = (Qs[..., :, None, :] * Ks[..., None, :, :] * decay).sum(-1)  # (R, N, H, S, s, s)
    eye_S = torch.eye(S, dtype=Q.dtype, device=Q.device)
    A = A + (blocks[..., :, :, None, :] * eye_S[:, None, :, None]).reshape(R, N, H, L, L)
    # 3. the diagonal: the current token, with the bonus
    return A + torch.diag_embed((Q * K * bonus).sum(-1))


# eager inside a torch.compile'd model (the graph breaks around it): the packed-document layout reads
# data-dependent sizes (nonzero), and tracing would unroll the loop over chunks
@torch.compiler.disable
def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA (``u`` None) or RWKV-6 (``u`` (H, K)). q, k, g (B, T, H, K); v (B, T, H, V); states
    (B, H, K, V), or one per packed sequence (``cu_seqlens``)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = None if initial_state is None else initial_state.to(acc)
    if T == 0:
        final = None
        if output_final_state:
            final = h0.clone() if h0 is not None else q.new_zeros(rows, H, Dk, Dv, dtype=acc)
        return v.new_zeros(v.shape), final
    L = min(chunk_size, T)
    docs = Documents(B, T, cu_seqlens, L, q.device)
    R, N = docs.R, docs.N
    Q, K, V, G = (docs.chunks(x, acc).transpose(2, 3) for x in (q, k, v, g))  # (R, N, H, L, D)
    b = G.cumsum(-2)
    c = b if u is None else b - G
    b_before = torch.cat([torch.zeros_like(b[..., :1, :]), b], dim=-2)  # (R, N, H, L + 1, K): b_{t-1}
    bonus = 1.0 if u is None else u.to(acc)[:, None, :]  # (H, 1, K)
    pos = torch.arange(L, device=q.device)
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=q.device)

    # 1. inside the chunks: decayed scores, masked to each token's own document
    A = _intra_chunk_scores(Q, K, b, c, bonus, sub_chunk_size(L))
    same_doc = docs.doc[..., :, None] == docs.doc[..., None, :]  # (R, N, L, L)
    A = A * same_doc[:, :, None]
    O = A @ V  # (R, N, H, L, V)

    # 2. each chunk's update of the state at its end, from the tokens of the document its last token is in; a
    # document starting inside the chunk brings its initial state, decayed from its first token to the chunk's end
    b_end = b[..., -1, :]  # (R, N, H, K)
    last_doc = docs.doc[..., -1]  # (R, N)
    mine = (docs.doc == last_doc[..., None])[:, :, None, :, None]  # (R, N, 1, L, 1)
    K_end = K * torch.exp(torch.where(mine, b_end[..., None, :] - b, neg_inf))
    U = K_end.transpose(-1, -2) @ V  # (R, N, H, K, V)
    carried_end = docs.carried[..., -1]  # (R, N)
    if h0 is not None:
        first = L - 1 - docs.since_start[..., -1]  # offset of the last document's first token, if inside
        h0_ext = torch.cat([h0, h0.new_zeros(1, H, Dk, Dv)])  # a dummy document for the padding
        enter = torch.exp(b_end - _at(b_before, first.clamp(min=0)))  # (R, N, H, K)
        U = U + torch.where(carried_end[:, :, None, None, None], 0.0, enter[..., None] * h0_ext[last_doc])
    # (R, N, H, K); 0 where the document ends in the chunk
    decay = torch.exp(b_end) * carried_end[:, :, None, None]

    # 3. the state entering every chunk: a scan over chunks
    # (unbound once: indexing inside the loop would make the backward fill a zero tensor of U's size per chunk)
    decays, updates = decay[..., None].unbind(1), U.unbind(1)
    S = [U.new_zeros(R, H, Dk, Dv)]
    for n in range(N - 1):
        S.append(decays[n] * S[-1] + updates[n])
    S_in = torch.stack(S, 1)  # (R, N, H, K, V)

    # 4. outputs read the state entering the chunk (tokens of a document carried into it) ...
    Qc = Q * torch.exp(c)
    O = O + (Qc @ S_in) * docs.carried[:, :, None, :, None]
    # ... or their document's initial state (tokens of a document starting in the chunk)
    if h0 is not None:
        O = _read_initial_states(O, Q, c, b_before, h0, docs)
    out = docs.unchunk((scale * O).transpose(2, 3), T).reshape(B, T, H, Dv).to(v.dtype)
    if not output_final_state:
        return out, None
    return out, _final_states(docs, K, V, b, b_before, S_in, h0, rows, pos)


def _read_initial_states(O, Q, c, b_before, h0, docs: Documents) -> torch.Tensor:
    """O plus, for every non-empty document, its tokens of the chunk it starts in reading its initial state:
    (q_i * e^{c_i - b_before_first}) h0 (exponents <= 0)."""
    ids = docs.ids
    if not ids.numel():
        return O
    R, N, H, L, _ = Q.shape
    first = docs.first[ids]
    row, n, o = docs.row[ids], first // docs.L, first % docs.L
    mine = (docs.doc[row, n] == ids[:, None])[:, None, :, None]  # (Dn, 1, L, 1)
    ref = _at(b_before[row, n], o)[:, :, None, :]  # (Dn, H, 1, K)
    Qd = Q[row, n] * torch.exp(torch.where(mine, c[row, n] - ref, float("-inf")))
    reads = Qd @ h0[ids]  # (Dn, H, L, V)
    flat = torch.zeros_like(O).view(R * N, H, L, -1).index_add(0, row * N + n, reads)
    return O + flat.view(O.shape)


def _final_states(docs: Documents, K, V, b, b_before, S_in, h0, rows: int, pos) -> torch.Tensor:
    """The state after each sequence's last token, (D, H, K, V): its tokens of the chunk it ends in, plus the state
    entering that chunk or (if it starts there) its initial state, decayed to the last token."""
    ids = docs.ids
    H, Dk, Dv = K.shape[2], K.shape[-1], V.shape[-1]
    final = h0.clone() if h0 is not None else K.new_zeros(rows, H, Dk, Dv)
    if not ids.numel():
        return final
    row, n, o = docs.ends()
    b_o = _at(b[row, n], o)  # (Dn, H, K)
    mine = ((docs.doc[row, n] == ids[:, None]) & (pos[None, :] <= o[:, None]))[:, None, :, None]
    Kd = K[row, n] * torch.exp(torch.where(mine, b_o[:, :, None, :] - b[row, n], float("-inf")))
    states = Kd.transpose(-1, -2) @ V[row, n]  # (Dn, H, K, V)
    carried = docs.carried[row, n, o][:, None, None, None]
    states = states + torch.where(carried, torch.exp(b_o)[..., None] * S_in[row, n], 0.0)
    if h0 is not None:
        first = o - docs.since_start[row, n, o]  # the document's first token, if in this chunk
        enter = torch.exp(b_o - _at(b_before[row, n], first.clamp(min=0)))
        states = states + torch.where(carried, 0.0, enter[..., None] * h0[ids])
    return final.index_put((ids,), states)
