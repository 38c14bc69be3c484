"""Feed-forward blocks: SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer") and the plain GELU MLP.

Projection names follow transformers (``gate_proj``, ``up_proj``, ``down_proj``) so that peft finds them.

On a CPU, long inputs run the plain MLP's activation and down projection a block of rows at a time
(``_RowBlockedMLP``): only the pre-activation is kept whole. This is the chunked feed-forward of Reformer (Kitaev et
al., 2020, arXiv:2001.04451, section 3), here for speed rather than memory: at T = 65536 and width 1024 the
activation, its gradient and the down projection's input gradient are 256 MiB each, and the C library maps every
buffer that large afresh and faults it in page by page on each step; blocks of ``MLP_BLOCK_ELEMENTS`` stay in cache
and are reused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.activations import ACT2FN

from zoo.ops.blocking import row_blocks

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


# rows x intermediate numbers from which the plain MLP runs in row blocks on a CPU (2^23: 32 MiB in float32, the
# largest block the C library's allocator keeps for reuse); numbers per block of rows (2^20: 4 MiB in float32)
MLP_BLOCKED_FROM = 1 << 23
MLP_BLOCK_ELEMENTS = 1 << 20


class _RowBlockedMLP(torch.autograd.Function):
    """``down(act(up(x)))`` with the activation, the down projection and the whole backward a block of rows at a
    time. Keeps x and the pre-activation a = up(x); the backward recomputes act(a) per block (for the down
    projection's weight gradient) and differentiates the activation through autograd, so any activation works."""

    @staticmethod
    def forward(ctx, x, up_w, up_b, down_w, down_b, act):
        x2 = x.reshape(-1, x.shape[-1])
        a = x2 @ up_w.t() if up_b is None else torch.addmm(up_b, x2, up_w.t())
        y = x2.new_empty(x2.shape[0], down_w.shape[0])
        blocks = row_blocks(x2.shape[0], a.shape[1], block_elements=MLP_BLOCK_ELEMENTS)
        for r0, r1 in blocks:
            g = act(a[r0:r1])
            if down_b is None:
                torch.mm(g, down_w.t(), out=y[r0:r1])
            else:
                torch.addmm(down_b, g, down_w.t(), out=y[r0:r1])
        ctx.save_for_backward(x2, a, up_w, down_w)
        ctx.act, ctx.blocks, ctx.x_shape = act, blocks, x.shape
        ctx.biases = (up_b is not None, down_b is not None)
        return y.view(*x.shape[:-1], down_w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, a, up_w, down_w = ctx.saved_tensors
        dy = dy.reshape(-1, down_w.shape[0])
        need_x, need_up_w, need_up_b, need_down_w, need_down_b = ctx.needs_input_grad[:5]
        dx = torch.empty_like(x2) if need_x else None
        d_up_w = torch.zeros_like(up_w) if need_up_w else None
        d_down_w = torch.zeros_like(down_w) if need_down_w else None
        d_up_b = a.new_zeros(a.shape[1]) if need_up_b else None
        for r0, r1 in ctx.blocks:
            a_r = a[r0:r1].detach().requires_grad_()
            with torch.enable_grad():
                g = ctx.act(a_r)
            dy_r = dy[r0:r1]
            if need_down_w:
                d_down_w.addmm_(dy_r.t(), g.detach())
            (da,) = torch.autograd.grad(g, a_r, dy_r @ down_w)
            if need_x:
                torch.mm(da, up_w, out=dx[r0:r1])
            if need_up_w:
                d_up_w.addmm_(da.t(), x2[r0:r1])
            if need_up_b:
                d_up_b += da.sum(0)
        d_down_b = dy.sum(0) if need_down_b else None
        return dx.view(ctx.x_shape) if need_x else None, d_up_w, d_up_b, d_down_w, d_down_b, None


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a peft or quantized wrapper) without hooks: its weights may be used directly."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


class MLP(nn.Module):
    """``down(act(up(x)))``, the original transformer feed-forward (GELU by default). On a CPU, when gradients are
    needed and rows x intermediate reaches ``MLP_BLOCKED_FROM``, a block of rows at a time (``_RowBlockedMLP``);
    the same function either way."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_blocked(x):
            up, down = self.up_proj, self.down_proj
            return _RowBlockedMLP.apply(x, up.weight, up.bias, down.weight, down.bias, self.act_fn)
        return self.down_proj(self.act_fn(self.up_proj(x)))

    def runs_blocked(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs in row blocks: a CPU, gradients, plain linear layers of x's dtype, and
        x.numel() / hidden x intermediate at least ``MLP_BLOCKED_FROM``."""
        up, down = self.up_proj, self.down_proj
        return (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and x.numel() // max(x.shape[-1], 1) * up.out_features >= MLP_BLOCKED_FROM
            and _plain_linear(up)
            and _plain_linear(down)
            and up.weight.dtype == down.weight.dtype == x.dtype
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            and not torch.is_autocast_enabled("cpu")
        )


def build_mlp(kind: str, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> nn.Module:
    """``kind`` is ``"swiglu"`` (gated) or ``"mlp"`` (plain)."""
    if kind in ("swiglu", "gated"):
        return GatedMLP(hidden_size, intermediate_size, act=act, bias=bias)
    if kind == "mlp":
        return MLP(hidden_size, intermediate_size, act=act, bias=bias)
    raise ValueError(f"mlp kind {kind!r} is not one of ('swiglu', 'mlp')")
