"""LSH and local attention as dense matrices: the oracle of ``zoo.ops.lsh_attention``.

Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv:2001.04451) attends, in each hashing
round, each query to the keys whose places in the round's bucket order fall in the query's chunk or the chunks
around it. Here that set is written out per round as a T x T matrix of counts, computed from ranks alone: the
query's place ``r * T + rank`` in the concatenation of the rounds' orders, its chunk, the chunks within
``num_chunks_before`` / ``num_chunks_after`` of it (modulo the number of chunks: the windows wrap around the ends),
and how many slots of those chunks hold each key (a key can appear more than once when the windows wrap onto
themselves or another round holds it). Every score is computed; the softmax weighs each key by its count.

Masking, in order: a key that is padding, in another segment, or (causal) after the query scores ``-1e9``; the
query's own position then scores ``-1e5`` whatever the masks said, so that a query attends itself only when no
other key is allowed (the paper's shared-QK rule). The rounds are combined with weights ``softmax(lse_r)``, the
log-sum-exp of each round's scores. O(num_hashes * T^2) memory: short inputs only; any dtype, float64 included.
"""

from __future__ import annotations

import torch


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(score of a masked key, score of the query's own position): finite, so that rounds combine by lse."""
    return (-1e4, -1e3) if dtype == torch.float16 else (-1e9, -1e5)


def window_counts(num_chunks: int, chunk_of_slot: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(num_chunks, S): how many of chunk c's window offsets ``-before .. after`` land on the chunk of slot s."""
    c = torch.arange(num_chunks, device=chunk_of_slot.device)[:, None]
    counts = torch.zeros(num_chunks, chunk_of_slot.shape[0], dtype=torch.long, device=chunk_of_slot.device)
    for d in range(-before, after + 1):
        counts += ((c + d) % num_chunks == chunk_of_slot[None, :]).long()
    return counts


def _key_mask(T, pos_q, pos_k, key_padding_mask, segment_ids, causal, device):
    """(B, 1, T, T) bool: query i may attend key j (padding, segments, causality; no self rule)."""
    allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if causal:
        allowed = allowed & (pos_q[:, None] >= pos_k[None, :])
    return allowed


def _attend(scores, counts, v, dropout):
    """scores (B, H, n, T, T) already masked, counts broadcastable to it; v (B, T, H, D) ->
    out (B, H, n, T, D), lse (B, H, n, T)."""
    scores = scores.masked_fill(counts == 0, float("-inf"))
    weighted = scores + torch.log(counts.clamp(min=1).to(scores.dtype))
    lse = torch.logsumexp(weighted, dim=-1)
    probs = torch.exp(weighted - lse[..., None])
    probs = torch.nn.functional.dropout(probs, dropout)
    return torch.einsum("bhnij,bjhd->bhnid", probs, v), lse


def _combine(out, lse):
    """Rounds weighed by softmax of their lse: (B, H, n, T, D), (B, H, n, T) -> (B, T, H, D)."""
    w = torch.softmax(lse, dim=2)
    return (out * w[..., None]).sum(2).transpose(1, 2)


def naive_lsh_attention(
    qk, v, buckets, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout=0.0
):
    """qk, v (B, T, H, D); buckets (B, H, n, T). Returns (B, T, H, D)."""
    B, T, H, D = qk.shape
    n = buckets.shape[2]
    masked, own = mask_values(qk.dtype)
    keys = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) * D**-0.5
    scores = torch.einsum("bihd,bjhd->bhij", qk, keys)[:, :, None]  # (B, H, 1, T, T)
    pos = torch.arange(T, device=qk.device)
    allowed = _key_mask(T, pos, pos, key_padding_mask, segment_ids, causal, qk.device)[:, :, None]
    scores = torch.where(allowed, scores, torch.full_like(scores, masked))
    scores = torch.where(pos[:, None] == pos[None, :], torch.full_like(scores, own), scores)
    if T <= chunk_length:
        # one chunk holds the whole sequence: plain attention, one round
        out, _ = _attend(scores, torch.ones(1, 1, 1, T, T, dtype=torch.long, device=qk.device), v, dropout)
        return out[:, :, 0].transpose(1, 2)
    # rank of every token in its round's order (bucket, then position), and the token at every slot
    order = torch.sort(buckets, dim=-1, stable=True).indices  # (B, H, n, T)
    rank = torch.argsort(order, dim=-1)
    num_chunks = n * T // chunk_length
    slot_chunk = torch.arange(n * T, device=qk.device) // chunk_length
    per_chunk = window_counts(num_chunks, slot_chunk, before, after).to(qk.dtype)  # (NC, nT)
    tokens = torch.nn.functional.one_hot(order.reshape(B, H, n * T), T).to(qk.dtype)  # (B, H, nT, T)
    chunk_counts = torch.einsum("cs,bhst->bhct", per_chunk, tokens).round().long()  # (B, H, NC, T)
    query_chunk = (torch.arange(n, device=qk.device)[:, None] * T + rank) // chunk_length  # (B, H, n, T)
    counts = torch.gather(
        chunk_counts[:, :, None].expand(B, H, n, num_chunks, T),
        3,
        query_chunk[..., None].expand(B, H, n, T, T),
    )  # (B, H, n, T queries, T keys)
    out, lse = _attend(scores, counts, v, dropout)
    return _combine(out, lse)


def naive_local_attention(
    q, k, v, chunk_length, before, after, causal, key_padding_mask, segment_ids, dropout=0.0
):
    """Each query attends the keys of its chunk of ``chunk_length`` positions and of the chunks around it
    (wrapping around the ends), q, k, v (B, T, H, D) -> (B, T, H, D); masked keys score ``-1e9``."""
    B, T, H, D = q.shape
    masked, _ = mask_values(q.dtype)
    scores = torch.einsum("bihd,bjhd->bhij", q, k * D**-0.5)[:, :, None]
    pos = torch.arange(T, device=q.device)
    allowed = _key_mask(T, pos, pos, key_padding_mask, segment_ids, causal, q.device)[:, :, None]
    scores = torch.where(allowed, scores, torch.full_like(scores, masked))
    if T <= chunk_length:
        counts = torch.ones(1, 1, 1, T, T, dtype=torch.long, device=q.device)
    else:
        chunk = pos // chunk_length
        counts = window_counts(T // chunk_length, chunk, before, after)[chunk][None, None, None]
    out, _ = _attend(scores, counts, v, dropout)
    return out[:, :, 0].transpose(1, 2)
