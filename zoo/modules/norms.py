"""Normalisation layers shared by every zoo model: RMSNorm (Zhang & Sennrich, 2019) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.modules.mlp import SILU_NAMES, act_mul


def _constant_eps(eps, acc: torch.dtype):
    """A per-row epsilon tensor detached (it gets no gradient) in the computing dtype; a float as it is."""
    return eps.detach().to(acc) if isinstance(eps, torch.Tensor) else eps


def inverse_rms(x: torch.Tensor, eps) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) over the last dim, keepdim; one reduction, no full-size temporary."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNormFunction(torch.autograd.Function):
    """``x * rsqrt(mean(x^2) + eps)`` over the last dim, times an optional ``weight``, with a hand-written backward.

    With r = rsqrt(mean(x^2) + eps) and dy the gradient reaching the normalised x (times the weight):
    dx = r dy - x r^3 mean(dy x), dweight = sum over rows of dout * x r. Only x and r are kept for the backward
    (the normalised x is recomputed for the weight's gradient), where autograd would keep a chain of full-size
    temporaries (square, mean, rsqrt, product, and the normalised x for the weight).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps, weight: torch.Tensor | None):
        r = inverse_rms(x, eps)
        ctx.save_for_backward(x, r, weight)
        y = x * r
        return y if weight is None else y.mul_(weight)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        d_weight = None
        if weight is not None and ctx.needs_input_grad[2]:
            d_weight = (d_out * x).mul_(r).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dy = d_out if weight is None else d_out * weight
        dx = _rms_input_grad(x, r, dy) if ctx.needs_input_grad[0] else None
        return dx, None, d_weight


def _rms_input_grad(x: torch.Tensor, r: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d/dx of x * r with r = rsqrt(mean(x^2) + eps), given dy: r dy - x r^3 mean(dy x)."""
    mean_dy_x = torch.linalg.vecdot(dy, x, dim=-1).unsqueeze(-1).div_(x.shape[-1])
    return torch.addcmul(dy * r, x, r.pow(3).mul_(mean_dy_x), value=-1)


class _GatedRMSNormFunction(torch.autograd.Function):
    """``silu(gate) * x * rsqrt(mean(x^2) + eps)``: a norm and its swish output gate in one (RetNet's group norm
    and gate), keeping x, the gate and the inverse RMS for the backward, where the separate steps would also
    keep the normalised x and silu(gate)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, eps):
        r = inverse_rms(x, eps)
        ctx.save_for_backward(x, gate, r)
        return F.silu(gate).mul_(x).mul_(r)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        x, gate, r = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(d_out * x * r, gate) if ctx.needs_input_grad[1] else None
        dx = _rms_input_grad(x, r, F.silu(gate).mul_(d_out)) if ctx.needs_input_grad[0] else None
        return dx, d_gate, None


def rms_norm(x: torch.Tensor, eps: float | torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMS-normalise the last dim of ``x`` in at least float32; return it in the dtype of ``x`` (times ``weight``).

    ``eps`` is a float, or a tensor broadcastable to ``x[..., :1]`` for a per-row epsilon (it gets no
    gradient). A per-row epsilon folds a detached per-row scale f into the norm: ``rms_norm(f * x, eps)`` equals
    ``rms_norm(x, eps / f**2)`` for f > 0. In float32/64 the weight is applied inside one autograd.Function;
    in lower precision the normalised x is cast back first and then scaled, as transformers' Llama does.
    """
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    eps = _constant_eps(eps, acc)
    grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    if not grad:  # inference: the same arithmetic without the autograd.Function's call overhead
        xa = x.to(acc)
        y = (xa * inverse_rms(xa, eps)).to(dtype)
        return y if weight is None else weight * y
    if dtype == acc:
        return _RMSNormFunction.apply(x, eps, weight)
    y = _RMSNormFunction.apply(x.to(acc), eps, None).to(dtype)
    return y if weight is None else weight * y


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, eps: float | torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """``act(gate) * rms_norm(x, eps)`` with ``gate`` shaped like ``x``: a normalised output times its gate.

    For silu/swish in float32/64 with gradients this is one autograd.Function that keeps only x, the gate and
    the inverse RMS (two activation-sized tensors fewer than norm then gate); otherwise the two steps.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    fused = act in SILU_NAMES and x.dtype == gate.dtype == acc and x.shape == gate.shape
    if fused and torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad):
        return _GatedRMSNormFunction.apply(x, gate, _constant_eps(eps, acc))
    return act_mul(act, gate, rms_norm(x, eps))


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * weight``, computed in at least float32, cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)

    def extra_repr(self) -> str:
        return f"{0 if self.weight is None else self.weight.shape[0]}, eps={self.eps}"


def build_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    """``kind`` is ``"rmsnorm"`` or ``"layernorm"``."""
    if kind == "rmsnorm":
        return RMSNorm(hidden_size, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(hidden_size, eps=eps)
    raise ValueError(f"norm kind {kind!r} is not one of ('rmsnorm', 'layernorm')")
