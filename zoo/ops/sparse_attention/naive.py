"""Sparse attention as the papers define it: dense attention with the pattern written out as a T x T mask.

The oracle of ``zoo.ops.sparse_attention`` (Longformer, Beltagy et al. 2020, "Longformer: The Long-Document
Transformer", arXiv:2004.05150): every score is computed and the pattern masks the ones a query may not see. Global
queries use their own projections (``global_q``/``global_k``/``global_v``) when given, as Longformer's global
attention does; local queries see global keys through the regular ones. A query with no key left outputs zeros.
Memory is O(T^2): short inputs only. Runs in any dtype, float64 included.

BigBird's block layout (Zaheer et al. 2020, arXiv:2007.14062) is written out the same way, as a T x T matrix of
counts rather than booleans (:func:`block_counts`): a random block that repeats a window or global block counts
once more, and the softmax weighs each key by its count (``count * exp(score)``).
"""

from __future__ import annotations

import torch

from zoo.ops.sparse_attention.pattern import SparsePattern


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``allowed``; a row with nothing allowed gives zeros (not nan)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def dense_allowed(
    pattern: SparsePattern,
    T: int,
    is_global: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device,
) -> torch.Tensor:
    """(B or 1, T, T) bool: query i may attend key j."""
    pos = torch.arange(T, device=device)
    allowed = pattern.window_mask(pos[:, None], pos[None, :])[None]  # (1, T, T)
    if is_global is not None:
        allowed = allowed | is_global[:, None, :] | is_global[:, :, None]
        if pattern.causal:
            allowed = allowed & (pos[:, None] >= pos[None, :])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed


def block_counts(
    pattern: SparsePattern,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    num_blocks: int,
    plan: torch.Tensor | None,
) -> torch.Tensor:
    """How many times each query attends each key under a block layout: (B or 1, H or 1, Tq, Tk) integers.

    ``q_index`` (B or 1, Tq) and ``k_index`` (B or 1, Tk) are the places of the tokens in the layout (their
    blocks are ``index // block_size``); ``num_blocks`` the blocks of the layout; ``plan`` (H or 1, num_blocks, r)
    the random blocks (``-1``: none), or None.
    """
    qb, kb = q_index // pattern.block_size, k_index // pattern.block_size
    q_global = pattern.global_block_mask(qb, num_blocks)[:, :, None]  # (B, Tq, 1)
    base = (
        pattern.window_block_mask(qb[:, :, None], kb[:, None, :])
        | pattern.global_block_mask(kb, num_blocks)[:, None, :]
        | q_global
    )
    counts = base[:, None].long()  # (B, 1, Tq, Tk)
    if plan is not None and plan.shape[-1] > 0:
        H = plan.shape[0]
        # per head, query block and key block: how often the key block is among the query block's random blocks
        hits = torch.zeros(H, num_blocks, num_blocks + 1, dtype=torch.long, device=plan.device)
        hits.scatter_add_(2, torch.where(plan < 0, num_blocks, plan), torch.ones_like(plan))
        hits = hits[..., :num_blocks]
        h = torch.arange(H, device=plan.device)[None, :, None, None]
        qbc = qb.clamp(0, num_blocks - 1)[:, None, :, None]
        kbc = kb.clamp(0, num_blocks - 1)[:, None, None, :]
        extra = hits[h, qbc, kbc] * (kb[:, None, None, :] < num_blocks)  # (B, H, Tq, Tk)
        counts = counts + extra.masked_fill(q_global[:, None], 0)
    if pattern.causal:
        counts = counts * (k_index[:, None, None, :] <= q_index[:, None, :, None])
    return counts


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    plan: torch.Tensor | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """BigBird's block layout as a dense T x T matrix of counts; arguments as validated by ``sparse_attention``,
    ``plan`` the random blocks (H or 1, num_blocks, r) or None."""
    T = q.shape[1]
    index = torch.arange(T, device=q.device)[None]
    counts = block_counts(pattern, index, index, pattern.num_blocks(T), plan)  # (1, H, T, T)
    if key_padding_mask is not None:
        counts = counts * key_padding_mask[:, None, None, :]
    return attend_counts(q, k, v, counts, scale, dropout)


def attend_counts(q, k, v, counts, scale, dropout):
    """Softmax attention weighing each key by its count: q (B, Tq, H, D), k, v (B, Tk, H, D), counts broadcast to
    (B, H, Tq, Tk)."""
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.einsum("bihd,bjhd->bhij", q, k).to(acc) * scale
    scores = scores + torch.log(counts.clamp(min=1).to(acc))
    probs = torch.nn.functional.dropout(masked_softmax(scores, counts > 0), dropout).to(v.dtype)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def _attend(q, k, v, allowed, scale, dropout):
    """q, k, v (B, T, H, D), allowed (B, T, T) -> (B, T, H, D)."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    probs = torch.nn.functional.dropout(masked_softmax(scores, allowed[:, None]), dropout)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def naive_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    scale: float,
    is_global: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    global_q: torch.Tensor | None,
    global_k: torch.Tensor | None,
    global_v: torch.Tensor | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Arguments as validated by ``zoo.ops.sparse_attention.sparse_attention``; ``is_global`` (B, T) bool or None."""
    T = q.shape[1]
    allowed = dense_allowed(pattern, T, is_global, key_padding_mask, segment_ids, q.device)
    out = _attend(q, k, v, allowed, scale, dropout)
    if is_global is not None and global_q is not None:
        out_global = _attend(global_q, global_k, global_v, allowed, scale, dropout)
        out = torch.where(is_global[:, :, None, None], out_global, out)
    return out
