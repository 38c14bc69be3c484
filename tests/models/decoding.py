"""Helpers for the decoding checks of every model test."""

from __future__ import annotations

import torch

from zoo.models.utils import CACHE_NAME, output_cache


@torch.no_grad()
def full_and_incremental_logits(model, ids: torch.Tensor, prefix: int, step: int = 1):
    """The logits of one full forward over ``ids``, and of a forward over the first ``prefix`` tokens followed by
    forwards of ``step`` tokens at a time with the cache; returns (full, incremental, cache)."""
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :prefix], use_cache=True)
    pieces, cache = [out.logits], output_cache(out)
    for t in range(prefix, ids.shape[1], step):
        out = model(ids[:, t : t + step], use_cache=True, **{CACHE_NAME: cache})
        pieces.append(out.logits)
        cache = output_cache(out)
    return full, torch.cat(pieces, dim=1), cache
