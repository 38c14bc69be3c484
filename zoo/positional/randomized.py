"""Randomized positional encodings (Ruoss et al., 2023, "Randomized Positional Encodings Boost Length
Generalization of Transformers", arXiv:2305.16843).

While training on length ``T``, positions are an ordered random subset of ``[0, max_position)``, so the model sees
the large position values it will meet at test time on longer inputs. At evaluation, positions are ``0..T-1``.
"""

from __future__ import annotations

import torch


def randomized_position_ids(
    batch_size: int, seq_len: int, max_position: int, *, generator: torch.Generator | None = None, device=None
) -> torch.LongTensor:
    """``(B, T)`` increasing positions, each row a sorted sample without replacement from ``[0, max_position)``.

    The first position of every row is 0, so packed-document detection (a restart at 0) still works."""
    if max_position < seq_len:
        raise ValueError(f"max_position={max_position} must be at least the sequence length {seq_len}")
    scores = torch.rand(batch_size, max_position - 1, generator=generator)
    picks = scores.topk(seq_len - 1, dim=-1).indices.sort(-1).values + 1
    zeros = torch.zeros(batch_size, 1, dtype=torch.long)
    return torch.cat([zeros, picks], dim=-1).to(device)


def randomize_packed_positions(
    position_ids: torch.LongTensor, max_position: int, *, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Randomize the positions of each packed document separately (restarts at 0 are kept)."""
    out = position_ids.clone()
    for b in range(position_ids.shape[0]):
        starts = (position_ids[b] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
        for s, e in zip(starts[:-1], starts[1:]):
            if e - s > 1:
                out[b, s:e] = randomized_position_ids(
                    1, e - s, max(max_position, e - s), generator=generator
                )[0]
    return out
