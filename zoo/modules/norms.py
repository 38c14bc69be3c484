"""Normalisation layers shared by every zoo model: RMSNorm (Zhang & Sennrich, 2019) and LayerNorm."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * weight``, computed in at least float32, cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            return self.weight * x.to(dtype)
        return x.to(dtype)

    def extra_repr(self) -> str:
        return f"{0 if self.weight is None else self.weight.shape[0]}, eps={self.eps}"


def build_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    """``kind`` is ``"rmsnorm"`` or ``"layernorm"``."""
    if kind == "rmsnorm":
        return RMSNorm(hidden_size, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(hidden_size, eps=eps)
    raise ValueError(f"norm kind {kind!r} is not one of ('rmsnorm', 'layernorm')")
