"""Caches for decoding.

Attention layers use transformers' own ``DynamicCache`` (one key/value layer per attention layer). Recurrent layers
(retention, selective scans, RWKV, ...) keep a fixed-size state per layer in :class:`RecurrentCache`, whose size
does not grow with the context: that is what makes their per-token decoding cost O(1). Hybrid models keep both.
"""

from __future__ import annotations

from typing import Any

import torch


class RecurrentCache:
    """Per-layer recurrent states for ``generate()``.

    Each layer stores a dict of tensors whose first dimension is the batch (for example ``{"state": S, "conv": c}``).
    ``seen_tokens`` counts the tokens already absorbed, which ``generate()`` reads through ``get_seq_length``.
    """

    is_compileable = False

    def __init__(self, num_layers: int | None = None):
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.seen_tokens = 0
        self.num_layers = num_layers

    def __len__(self) -> int:
        return len(self.states)

    def get(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        return self.states.get(layer_idx)

    def set(self, layer_idx: int, **tensors: torch.Tensor) -> None:
        self.states[layer_idx] = dict(tensors)

    def advance(self, num_tokens: int) -> None:
        """Called once per model forward, after every layer has updated its state."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, *args: Any, **kwargs: Any):
        return self.seen_tokens, 0

    def _map(self, fn) -> None:
        self.states = {i: {n: fn(t) for n, t in s.items()} for i, s in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])
