"""Longer tables for learned absolute position embeddings, by interpolation.

Longformer (Beltagy et al., 2020) initialised its 4K table by copying RoBERTa's 512 positions; linear
interpolation of the table (as done for ViT position embeddings, Dosovitskiy et al., 2021) keeps neighbouring
positions similar and preserves the learned trajectory. Both are offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def interpolate_position_table(
    table: torch.Tensor, new_length: int, mode: str = "linear", offset: int = 0
) -> torch.Tensor:
    """Stretch a ``(L, C)`` table to ``(new_length, C)``.

    ``mode="linear"`` resamples the learned trajectory; ``mode="copy"`` repeats it (Longformer's initialisation).
    The first ``offset`` rows (reserved positions, e.g. RoBERTa's padding offset of 2) are kept as they are.
    """
    if mode not in ("linear", "copy"):
        raise ValueError(f"mode={mode!r} is not one of ('linear', 'copy')")
    head, body = table[:offset], table[offset:]
    target = new_length - offset
    if target < body.shape[0]:
        raise ValueError(f"new_length={new_length} is shorter than the table ({table.shape[0]} rows)")
    if mode == "copy":
        reps = -(-target // body.shape[0])
        new_body = body.repeat(reps, 1)[:target]
    else:
        new_body = F.interpolate(body.T[None].float(), size=target, mode="linear", align_corners=True)[0].T
    return torch.cat([head, new_body.to(table.dtype)], dim=0)


def interpolate_position_embeddings(
    model: nn.Module,
    new_max_position_embeddings: int,
    mode: str = "linear",
    module_name: str = "embed_positions",
    offset: int = 0,
) -> nn.Module:
    """Replace every ``nn.Embedding`` called ``module_name`` with a longer interpolated one (same dtype, device and
    ``padding_idx``); ``max_position_embeddings`` becomes the new length in the config of ``model`` and of every
    submodule that has its own (a head's backbone)."""
    found = False
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] == module_name and isinstance(module, nn.Embedding):
            weight = interpolate_position_table(module.weight.data, new_max_position_embeddings, mode, offset)
            new = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=module.padding_idx)
            new = new.to(device=weight.device, dtype=weight.dtype)
            new.weight.data.copy_(weight)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no learned position table named {module_name!r}")
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
    for config in configs.values():
        if hasattr(config, "max_position_embeddings"):
            config.max_position_embeddings = new_max_position_embeddings
    return model
