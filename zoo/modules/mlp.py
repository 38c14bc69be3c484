"""Feed-forward blocks: SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer") and the plain GELU MLP.

Projection names follow transformers (``gate_proj``, ``up_proj``, ``down_proj``) so that peft finds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

SILU_NAMES = ("silu", "swish")
# transformers' activations written out elementwise whose function PyTorch computes in one fused kernel:
# gelu_new (BigBird, GPT-2) is 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), exactly the tanh form of
# F.gelu; written out it is seven passes over the activation forward and more backward
FUSED = {"gelu_new": lambda: nn.GELU(approximate="tanh")}


def activation(name: str) -> nn.Module:
    """The activation transformers calls ``name`` (``ACT2FN``), as a fused PyTorch module where one computes the
    same function (``FUSED``). Unknown names raise KeyError, as ``ACT2FN`` does."""
    if name in FUSED:
        return FUSED[name]()
    return ACT2FN[name]


class _SiluMul(torch.autograd.Function):
    """``silu(a) * b`` keeping only ``a`` and ``b`` for the backward: silu(a) is recomputed there instead of being
    stored (one activation-sized tensor less per gate; the same number of passes over memory)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        a, b = ctx.saved_tensors
        da = torch.ops.aten.silu_backward(d_out * b, a) if ctx.needs_input_grad[0] else None
        db = F.silu(a).mul_(d_out) if ctx.needs_input_grad[1] else None
        return da, db


def act_mul(act: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``act(a) * b``, the gated product of SwiGLU and of RetNet's output gate; silu/swish through ``_SiluMul``
    when gradients are needed (a and b of one dtype), any other transformers activation by name otherwise."""
    if (
        act in SILU_NAMES
        and a.dtype == b.dtype
        and torch.is_grad_enabled()
        and (a.requires_grad or b.requires_grad)
    ):
        return _SiluMul.apply(a, b)
    return activation(act)(a) * b


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; with ``act="silu"`` this is SwiGLU."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        activation(act)  # unknown names fail here, at construction
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_mul(self.act, self.gate_proj(x), self.up_proj(x)))


class MLP(nn.Module):
    """``down(act(up(x)))``, the original transformer feed-forward (GELU by default)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def build_mlp(kind: str, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> nn.Module:
    """``kind`` is ``"swiglu"`` (gated) or ``"mlp"`` (plain)."""
    if kind in ("swiglu", "gated"):
        return GatedMLP(hidden_size, intermediate_size, act=act, bias=bias)
    if kind == "mlp":
        return MLP(hidden_size, intermediate_size, act=act, bias=bias)
    raise ValueError(f"mlp kind {kind!r} is not one of ('swiglu', 'mlp')")
