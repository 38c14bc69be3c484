"""Inference on inputs of any length in fixed-size chunks, carrying the model's cache between them.

For recurrent models (retention, selective scans, RWKV) the cache is a fixed-size state, so memory does not grow
with the input: this is how a recurrent model reads a context far longer than it could process in one forward.
For attention models the key/value cache still grows, but activations are bounded by the chunk.
"""

from __future__ import annotations

import torch

from zoo.models.utils import CACHE_NAME, output_cache


@torch.no_grad()
def chunked_forward(
    model,
    input_ids: torch.LongTensor,
    chunk_size: int = 1024,
    *,
    return_logits: bool = True,
    logits_callback=None,
):
    """Run ``model`` over ``input_ids`` ``(B, T)`` chunk by chunk with its cache.

    Returns ``(logits or None, cache)``. ``logits_callback(start, logits_chunk)`` lets a caller consume each
    chunk's logits (for example to accumulate a loss) without keeping all of them.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    cache, pieces = None, []
    for start in range(0, input_ids.shape[1], chunk_size):
        out = model(input_ids[:, start : start + chunk_size], use_cache=True, **{CACHE_NAME: cache})
        cache = output_cache(out)
        if logits_callback is not None:
            logits_callback(start, out.logits)
        if return_logits:
            pieces.append(out.logits)
    return (torch.cat(pieces, dim=1) if return_logits else None), cache
