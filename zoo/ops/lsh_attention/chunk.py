"""LSH and local attention in sorted chunks: the CPU path of ``zoo.ops.lsh_attention``, O(n * T * c) memory.

Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv:2001.04451, section 2): in each of the
``n`` hashing rounds the tokens are stably sorted by bucket (ties keep position order), the rounds' orders are
concatenated (``n * T`` slots) and cut into chunks of ``c`` slots; each chunk of queries attends the keys of its own
chunk and of ``num_chunks_before`` / ``num_chunks_after`` chunks around it, the neighbours taken by rolling the chunk
axis (so the windows wrap around the ends of the concatenation, as the reference implementation does). The outputs
are put back in position order and the rounds combined by the softmax of their log-sum-exp. Local attention is the
same computation without hashing: chunks of positions. Only (n * T / c, c, c * window) scores exist at once; autograd
gives the backward through the gathers.
"""

from __future__ import annotations

import torch

from zoo.ops.lsh_attention.naive import mask_values


def _windows(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """x (B, H, NC, c, ...) -> (B, H, NC, c * (before + 1 + after), ...): each chunk followed by its neighbours
    ``-before .. after``, wrapping around."""
    if before == 0 and after == 0:
        return x
    parts = [torch.roll(x, shifts=-d, dims=2) for d in range(-before, after + 1)]
    return torch.cat(parts, dim=3)


def _allowed(pos_q, pos_k, ok, segment_ids, causal):
    """(B, H, NC, c, w) bool: a query may attend a key (padding, segments, causality; no self rule). ``ok`` (B, T)
    marks keys that may be attended at all; pos_q (B, H, NC, c) and pos_k (B, H, NC, w) are positions."""
    B, H = pos_q.shape[:2]
    T = ok.shape[1]

    def at(x, pos):  # x (B, T) read at pos (B, H, ...)
        return torch.gather(x[:, None].expand(B, H, T), 2, pos.reshape(B, H, -1)).view(pos.shape)

    allowed = at(ok, pos_k)[..., None, :]
    if causal:
        allowed = allowed & (pos_q[..., :, None] >= pos_k[..., None, :])
    if segment_ids is not None:
        allowed = allowed & (at(segment_ids, pos_q)[..., :, None] == at(segment_ids, pos_k)[..., None, :])
    return allowed


def _chunk_attend(q, k, v, pos_q, pos_k, allowed, self_rule, dropout):
    """q (B, H, NC, c, D), k, v (B, H, NC, w, D), positions pos_q (B, H, NC, c), pos_k (B, H, NC, w), allowed
    (B, H, NC, c, w) -> out (B, H, NC, c, D), lse (B, H, NC, c)."""
    masked, own = mask_values(q.dtype)
    scores = q @ k.transpose(-1, -2)
    scores = torch.where(allowed, scores, torch.full_like(scores, masked))
    if self_rule:
        scores = torch.where(pos_q[..., :, None] == pos_k[..., None, :], torch.full_like(scores, own), scores)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nn.functional.dropout(torch.exp(scores - lse[..., None]), dropout)
    return probs @ v, lse


def _key_ok(key_padding_mask, B, T, device):
    """(B, T) bool of keys that may be attended at all."""
    ok = torch.ones(B, T, dtype=torch.bool, device=device)
    return ok if key_padding_mask is None else ok & key_padding_mask.bool()


def _gather_tokens(x, index):
    """x (B, H, T, ...) gathered along T at index (B, H, S) -> (B, H, S, ...)."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
    return torch.gather(x, 2, idx)


def shared_keys(qk_h: torch.Tensor) -> torch.Tensor:
    """The keys of shared-QK attention: the query-keys (B, H, T, D) unit-normalised (RMS), scaled by D^-1/2."""
    D = qk_h.shape[-1]
    return qk_h * torch.rsqrt(qk_h.pow(2).mean(-1, keepdim=True) + 1e-6) * D**-0.5


def sorted_order(buckets: torch.Tensor, chunk_length: int) -> tuple[torch.Tensor, int]:
    """The token at every slot of each round's order, (B, H, n, T), sorted by bucket then position, and the chunk
    length; one round in position order, one chunk of T, when T is no longer than ``chunk_length``."""
    B, H, _, T = buckets.shape
    if T <= chunk_length:
        return torch.arange(T, device=buckets.device).expand(B, H, 1, T), T
    key = buckets * T + torch.arange(T, device=buckets.device)
    return torch.argsort(key, dim=-1), chunk_length  # distinct keys, so the sort is stable


def combine_rounds(out: torch.Tensor, lse: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Slot-order out (B, H, n * T, Dv) and lse (B, H, n * T) back to position order (slot r * T + s holds token
    order[r, s]), the rounds weighed by the softmax of their lse -> (B, T, H, Dv)."""
    B, H, n, T = order.shape
    undo = torch.argsort(order, dim=-1)
    out = _gather_tokens(out.reshape(B, H * n, T, -1), undo.reshape(B, H * n, T)).view(B, H, n, T, -1)
    if n == 1:
        return out[:, :, 0].transpose(1, 2)
    lse = torch.gather(lse.reshape(B, H, n, T), 3, undo)
    w = torch.softmax(lse, dim=2)
    return (out * w[..., None]).sum(2).transpose(1, 2)


def chunk_lsh_attention(
    qk, v, buckets, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout=0.0
):
    """qk, v (B, T, H, D); buckets (B, H, n, T). Returns (B, T, H, D)."""
    B, T, H, D = qk.shape
    qk_h, v_h = qk.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    keys = shared_keys(qk_h)
    ok = _key_ok(key_padding_mask, B, T, qk.device)
    order, c = sorted_order(buckets, chunk_length)
    num_chunks = order.shape[2] * T // c
    slots = order.reshape(B, H, -1)
    pos_q = slots.view(B, H, num_chunks, c)
    pos_k = _windows(pos_q, before, after) if T > chunk_length else pos_q
    q = _gather_tokens(qk_h, slots).view(B, H, num_chunks, c, D)
    k = _gather_tokens(keys, slots).view(B, H, num_chunks, c, D)
    vv = _gather_tokens(v_h, slots).view(B, H, num_chunks, c, -1)
    if T > chunk_length:
        k, vv = _windows(k, before, after), _windows(vv, before, after)
    allowed = _allowed(pos_q, pos_k, ok, segment_ids, causal)
    out, lse = _chunk_attend(q, k, vv, pos_q, pos_k, allowed, True, dropout)
    return combine_rounds(out.reshape(B, H, num_chunks * c, -1), lse.reshape(B, H, -1), order)


def chunk_local_attention(
    q, k, v, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout=0.0
):
    """q, k, v (B, T, H, D) -> (B, T, H, D): chunks of positions, each attending its window of chunks."""
    B, T, H, D = q.shape
    c = min(chunk_length, T)
    num_chunks = T // c
    chunked = lambda x: x.transpose(1, 2).reshape(B, H, num_chunks, c, -1)  # noqa: E731
    qc, kc, vc = chunked(q), chunked(k * D**-0.5), chunked(v)
    pos_q = torch.arange(T, device=q.device).view(1, 1, num_chunks, c).expand(B, H, num_chunks, c)
    if T > chunk_length:
        kc, vc = _windows(kc, before, after), _windows(vc, before, after)
        pos_k = _windows(pos_q, before, after)
    else:
        pos_k = pos_q
    allowed = _allowed(pos_q, pos_k, _key_ok(key_padding_mask, B, T, q.device), segment_ids, causal)
    out, _ = _chunk_attend(qc, kc, vc, pos_q, pos_k, allowed, False, dropout)
    return out.reshape(B, H, T, -1).transpose(1, 2)
