"""Feed-forward blocks: SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer") and the plain GELU MLP.

Projection names follow transformers (``gate_proj``, ``up_proj``, ``down_proj``) so that peft finds them.

On a CPU, long inputs run both MLPs' activation (and gate) and down projection a block of rows at a time
(``_RowBlockedMLP``): only the input projections' outputs are kept whole. This is the chunked feed-forward of
Reformer (Kitaev et al., 2020, arXiv:2001.04451, section 3), here for speed rather than memory: at T = 65536 and
width 1024 the activation, its gradient and the down projection's input gradient are 256 MiB each, and the C
library maps every buffer that large afresh and faults it in page by page on each step; blocks of
``MLP_BLOCK_ELEMENTS`` stay in cache and are reused. Measured (2 threads, float32, forward + backward of one MLP):
the plain GELU MLP of width 1024 2.19 -> 1.52 s at T = 65536; SwiGLU of width 680 369 -> 321 ms at 16384 and
1.65 -> 1.36 s at 65536. Below ``MLP_BLOCKED_FROM`` the blocks lost (the GELU MLP at 4096: 83 -> 90 ms).
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


# rows x intermediate numbers from which the MLPs run in row blocks on a CPU (2^23: 32 MiB in float32, the
# largest block the C library's allocator keeps for reuse); numbers per block of rows (2^20: 4 MiB in float32)
MLP_BLOCKED_FROM = 1 << 23
MLP_BLOCK_ELEMENTS = 1 << 20


class _RowBlockedMLP(torch.autograd.Function):
    """``down(combine(in_1(x), ..., in_k(x)))`` with ``combine``, the down projection and the whole backward a block
    of rows at a time: ``combine`` is act(a) for the plain MLP, act(a_gate) * a_up for the gated one. Keeps x and
    the input projections' outputs; the backward recomputes ``combine`` per block (for the down projection's weight
    gradient) and differentiates it through autograd, so any activation works. ``params``: each input projection's
    weight and bias (None without), then the down projection's."""

    @staticmethod
    def forward(ctx, x, combine, *params):
        x2 = x.reshape(-1, x.shape[-1])
        *ins, down_w, down_b = params
        pre = [x2 @ w.t() if b is None else torch.addmm(b, x2, w.t()) for w, b in zip(ins[::2], ins[1::2])]
        y = x2.new_empty(x2.shape[0], down_w.shape[0])
        blocks = row_blocks(x2.shape[0], pre[0].shape[1], block_elements=MLP_BLOCK_ELEMENTS)
        for r0, r1 in blocks:
            hidden = combine(*(a[r0:r1] for a in pre))
            if down_b is None:
                torch.mm(hidden, down_w.t(), out=y[r0:r1])
            else:
                torch.addmm(down_b, hidden, down_w.t(), out=y[r0:r1])
        ctx.save_for_backward(x2, down_w, *ins[::2], *pre)
        ctx.combine, ctx.blocks, ctx.x_shape, ctx.k = combine, blocks, x.shape, len(pre)
        return y.view(*x.shape[:-1], down_w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, down_w, *rest = ctx.saved_tensors
        k = ctx.k
        in_w, pre = rest[:k], rest[k:]
        needs = ctx.needs_input_grad[2:]  # per parameter: w_1, b_1, ..., w_k, b_k, down_w, down_b
        dy = dy.reshape(-1, down_w.shape[0])
        dx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        d_w = [torch.zeros_like(w) if needs[2 * i] else None for i, w in enumerate(in_w)]
        d_b = [a.new_zeros(a.shape[1]) if needs[2 * i + 1] else None for i, a in enumerate(pre)]
        d_down_w = torch.zeros_like(down_w) if needs[2 * k] else None
        for r0, r1 in ctx.blocks:
            parts = [a[r0:r1].detach().requires_grad_() for a in pre]
            with torch.enable_grad():
                hidden = ctx.combine(*parts)
            dy_r = dy[r0:r1]
            if d_down_w is not None:
                d_down_w.addmm_(dy_r.t(), hidden.detach())
            d_pre = torch.autograd.grad(hidden, parts, dy_r @ down_w)
            for i, da in enumerate(d_pre):
                if dx is not None:
                    if i == 0:
                        torch.mm(da, in_w[i], out=dx[r0:r1])
                    else:
                        dx[r0:r1].addmm_(da, in_w[i])
                if d_w[i] is not None:
                    d_w[i].addmm_(da.t(), x2[r0:r1])
                if d_b[i] is not None:
                    d_b[i] += da.sum(0)
        d_down_b = dy.sum(0) if needs[2 * k + 1] else None
        grads = [g for pair in zip(d_w, d_b) for g in pair]
        return dx.view(ctx.x_shape) if dx is not None else None, None, *grads, d_down_w, d_down_b


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a peft or quantized wrapper) without hooks: its weights may be used directly."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _runs_blocked(mlp: nn.Module, x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> bool:
    """Whether ``mlp`` runs ``x`` in row blocks: a CPU, gradients, float32 or float64 (the weight gradients add up
    block by block, which in a 16-bit dtype would round at every block), plain linear ``layers`` of x's dtype (the
    input projections first), no autocast, and rows x intermediate at least ``MLP_BLOCKED_FROM``."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and x.numel() // max(x.shape[-1], 1) * layers[0].out_features >= MLP_BLOCKED_FROM
        and all(_plain_linear(layer) and layer.weight.dtype == x.dtype for layer in layers)
        and (x.requires_grad or any(p.requires_grad for p in mlp.parameters()))
        and not torch.is_autocast_enabled("cpu")
    )


def _blocked(x: torch.Tensor, combine, layers: tuple[nn.Linear, ...]) -> torch.Tensor:
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    return _RowBlockedMLP.apply(x, combine, *params)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; with ``act="silu"`` this is SwiGLU. On a CPU, when gradients are needed and
    rows x intermediate reaches ``MLP_BLOCKED_FROM``, a block of rows at a time (``_RowBlockedMLP``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation(act)  # unknown names fail here, at construction
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_blocked(x):
            return _blocked(x, self._combine, (self.gate_proj, self.up_proj, self.down_proj))
        return self.down_proj(act_mul(self.act, self.gate_proj(x), self.up_proj(x)))

    def _combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up

    def runs_blocked(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs in row blocks (``_runs_blocked``)."""
        return _runs_blocked(self, x, (self.gate_proj, self.up_proj, self.down_proj))


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
            return _blocked(x, self.act_fn, (self.up_proj, self.down_proj))
        return self.down_proj(self.act_fn(self.up_proj(x)))

    def runs_blocked(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs in row blocks (``_runs_blocked``)."""
        return _runs_blocked(self, x, (self.up_proj, self.down_proj))


def build_mlp(kind: str, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> nn.Module:
    """``kind`` is ``"swiglu"`` (gated) or ``"mlp"`` (plain)."""
    if kind in ("swiglu", "gated"):
        return GatedMLP(hidden_size, intermediate_size, act=act, bias=bias)
    if kind == "mlp":
        return MLP(hidden_size, intermediate_size, act=act, bias=bias)
    raise ValueError(f"mlp kind {kind!r} is not one of ('swiglu', 'mlp')")
