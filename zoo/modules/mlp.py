"""Feed-forward blocks: SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer") and the plain GELU MLP.

Projection names follow transformers (``gate_proj``, ``up_proj``, ``down_proj``) so that peft finds them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; with ``act="silu"`` this is SwiGLU."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """``down(act(up(x)))``, the original transformer feed-forward (GELU by default)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def build_mlp(kind: str, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> nn.Module:
    """``kind`` is ``"swiglu"`` (gated) or ``"mlp"`` (plain)."""
    if kind in ("swiglu", "gated"):
        return GatedMLP(hidden_size, intermediate_size, act=act, bias=bias)
    if kind == "mlp":
        return MLP(hidden_size, intermediate_size, act=act, bias=bias)
    raise ValueError(f"mlp kind {kind!r} is not one of ('swiglu', 'mlp')")
