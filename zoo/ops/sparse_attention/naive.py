"""Sparse attention as the papers define it: dense attention with the pattern written out as a T x T mask.

The oracle of ``zoo.ops.sparse_attention`` (Longformer, Beltagy et al. 2020, "Longformer: The Long-Document
Transformer", arXiv:2004.05150): every score is computed and the pattern masks the ones a query may not see. Global
queries use their own projections (``global_q``/``global_k``/``global_v``) when given, as Longformer's global
attention does; local queries see global keys through the regular ones. A query with no key left outputs zeros.
Memory is O(T^2): short inputs only. Runs in any dtype, float64 included.
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
