"""Helpers for the decoding checks of every model test."""

from __future__ import annotations

import torch


@torch.no_grad()
def full_and_incremental_logits(model, ids: torch.Tensor, prefix: int, step: int = 1):
    """The logits of one full forward over ``ids``, and of a forward over the first ``prefix`` tokens followed by
    forwards of ``step`` tokens at a time with the cache; returns (full, incremental, cache)."""
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :prefix], use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    for t in range(prefix, ids.shape[1], step):
        out = model(ids[:, t : t + step], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.past_key_values
    return full, torch.cat(pieces, dim=1), cache
