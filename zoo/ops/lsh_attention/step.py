"""One decoding step of LSH and local attention: the last token's row, O(T) work for T cached tokens.

Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv:2001.04451). A causal query that is the
last token of a sequence attends every earlier key its window reaches, so its row needs only which keys the window
holds, not the whole sorted and chunked attention of the sequence:

- LSH: in round r the query sits at slot ``r * L + rank`` of the concatenated bucket orders (``L``: the length
  the sequence is padded to, its padding sorting after every cached token), ``rank`` being the number of tokens
  in a bucket no later than its own (it is the latest position). Its window is the chunks ``-before .. after``
  around that slot (wrapping around). Which tokens a chunk of round r' holds is decided without sorting: the token
  at rank t has the bucket ``beta`` where the running bucket counts pass t, and is the ``t - count(< beta)``-th
  token of that bucket; a token's rank is at least t when its bucket is after ``beta``, or equal to it and no
  earlier in that bucket. Each key is weighed by how many window slots hold it, as in the chunked forward.
- local: the query's chunk of positions and ``before`` chunks back are the last ``(before + 1) * chunk`` keys at
  most; O(chunk) work.

Scores, masks and the same-position rule are those of ``naive.py``; padding slots of the chunked forward score
``-1e9`` against the query's own ``-1e5`` and add exactly nothing, so they are left out.
"""

from __future__ import annotations

import torch

from zoo.ops.lsh_attention.chunk import shared_keys
from zoo.ops.lsh_attention.naive import mask_values


def _at_least(buckets, counts_le, t):
    """(..., T) bool: a token's rank in its round's order is >= t. buckets (..., T); counts_le (..., nb + 1):
    tokens with bucket <= b; t (...) ranks."""
    beta = torch.searchsorted(counts_le, t[..., None], right=True)  # bucket of the token at rank t
    before_beta = torch.gather(
        torch.nn.functional.pad(counts_le, (1, 0)), -1, beta.clamp(max=counts_le.shape[-1])
    )
    index_in_bucket = t[..., None] - before_beta
    same = buckets == beta
    earlier_same = same.long().cumsum(-1) - 1
    return (buckets > beta) | (same & (earlier_same >= index_in_bucket))


def lsh_attention_step(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    *,
    padded_length: int,
    num_buckets_total: int,
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal row of the last token of ``qk``, ``v`` (B, T, H, D) as ``lsh_attention`` computes it over the
    sequence padded to ``padded_length`` (padding after the last token, masked).

    buckets: (B, H, n, T) of the T tokens (``hash_buckets``; ``key_padding_mask`` zeros in bucket
    ``num_buckets_total`` = prod(num_buckets)); ignored when ``padded_length <= chunk_length`` (plain attention,
    one round). key_padding_mask: (B, T). Returns (B, 1, H, Dv).
    """
    B, T, H, D = qk.shape
    if padded_length < T or (padded_length > chunk_length and padded_length % chunk_length):
        raise ValueError(
            f"lsh_attention_step: padded_length={padded_length} must be >= the {T} tokens and, above "
            f"chunk_length={chunk_length}, a multiple of it"
        )
    masked, own = mask_values(qk.dtype)
    qk_h, v_h = qk.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    scores = torch.einsum("bhd,bhjd->bhj", qk_h[:, :, -1], shared_keys(qk_h))  # (B, H, T)
    if key_padding_mask is not None:
        real = key_padding_mask.bool()[:, None, :]
        scores = torch.where(real, scores, torch.full_like(scores, masked))
    scores[..., -1] = own
    if padded_length <= chunk_length:
        # plain attention over the whole sequence, one round
        return torch.einsum("bhj,bhjd->bhd", torch.softmax(scores, dim=-1), v_h)[:, None]
    rounds = buckets.shape[2]
    L, c = padded_length, chunk_length
    num_chunks = rounds * L // c
    # 1. the query's slot in each round, its chunk and the chunks of its window
    rank = (buckets <= buckets[..., -1:]).sum(-1) - 1  # (B, H, n)
    slot = torch.arange(rounds, device=qk.device) * L + rank
    offsets = torch.arange(-num_chunks_before, num_chunks_after + 1, device=qk.device)
    window = (slot[..., None] // c + offsets) % num_chunks  # (B, H, n, W)
    # 2. the round and the rank range [lo, lo + c) each window chunk covers
    round_of = window * c // L
    lo = window * c - round_of * L
    W = window.shape[-1]
    round_buckets = torch.gather(
        buckets[:, :, None].expand(B, H, rounds, rounds, T),
        3,
        round_of[..., None].expand(B, H, rounds, W, T),
    )  # (B, H, n, W, T): the buckets of the round each window chunk lies in
    counts = torch.zeros(B, H, rounds, W, num_buckets_total + 1, dtype=torch.long, device=qk.device)
    counts.scatter_add_(-1, round_buckets, torch.ones_like(round_buckets))
    counts_le = counts.cumsum(-1)
    held = _at_least(round_buckets, counts_le, lo) & ~_at_least(round_buckets, counts_le, lo + c)
    # 3. each key weighed by the window slots holding it; the rounds combined by their log-sum-exp
    multiplicity = held.sum(3).to(scores.dtype)  # (B, H, n, T)
    weighted = scores[:, :, None] + torch.log(multiplicity)
    lse = torch.logsumexp(weighted, dim=-1)  # (B, H, n)
    out = torch.einsum("bhnj,bhjd->bhnd", torch.exp(weighted - lse[..., None]), v_h)
    if rounds > 1:
        out = (out * torch.softmax(lse, dim=-1)[..., None]).sum(2)
    else:
        out = out[:, :, 0]
    return out[:, None]


def local_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    past_length: int,
    chunk_length: int,
    num_chunks_before: int = 1,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal rows of new queries q (B, Tq, H, D) at positions ``past_length ..`` over the cached keys and values
    k, v (B, T, H, D) (T = past_length + Tq): each attends the keys at or before it in its chunk of positions and
    ``num_chunks_before`` chunks back, as ``local_attention`` computes them (its wrapped-around chunks all lie in
    the future). Only the keys some query's window reaches are read. key_padding_mask: (B, T). Returns
    (B, Tq, H, Dv)."""
    Tq, D = q.shape[1], q.shape[-1]
    start = max(0, (past_length // chunk_length - num_chunks_before) * chunk_length)
    k, v = k[:, start:], v[:, start:]
    masked, _ = mask_values(q.dtype)
    pos_q = torch.arange(past_length, past_length + Tq, device=q.device)[:, None]
    pos_k = torch.arange(start, start + k.shape[1], device=q.device)[None, :]
    allowed = (pos_k <= pos_q) & (pos_k // chunk_length >= pos_q // chunk_length - num_chunks_before)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, start : start + k.shape[1]]
    scores = torch.einsum("bihd,bjhd->bhij", q, k * D**-0.5)
    scores = torch.where(allowed, scores, torch.full_like(scores, masked))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)
