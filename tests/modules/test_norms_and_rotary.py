"""RMSNorm's hand-written backward and the complex form of the interleaved rotation, against plain autograd."""

from __future__ import annotations

import pytest
import torch

from zoo.modules import RMSNorm, apply_rotary_interleaved, gated_rms_norm, rms_norm, rotate_every_two


def reference_rms_norm(x: torch.Tensor, eps) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("per_row_eps", [False, True])
def test_rms_norm_forward_and_gradient(per_row_eps):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    eps = torch.rand(3, 5, 1, dtype=torch.float64) if per_row_eps else 1e-2
    torch.autograd.gradcheck(lambda t: rms_norm(t, eps), (x,))
    dy = torch.randn(3, 5, 7, dtype=torch.float64)
    (got,) = torch.autograd.grad(rms_norm(x, eps), x, dy)
    (want,) = torch.autograd.grad(reference_rms_norm(x, eps), x, dy)
    torch.testing.assert_close(rms_norm(x, eps), reference_rms_norm(x, eps))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("needs", ["both", "x", "weight"])
def test_rms_norm_weight_inside_the_function(needs):
    """The weight is applied inside the autograd.Function (float32/64): gradients of x and of the weight, each
    alone or together, equal plain autograd's."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=needs in ("both", "x"))
    w = torch.randn(7, dtype=torch.float64, requires_grad=needs in ("both", "weight"))
    eps = torch.rand(3, 5, 1, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, eps, b), (x, w))
    dy = torch.randn(3, 5, 7, dtype=torch.float64)
    inputs = [t for t in (x, w) if t.requires_grad]
    got = torch.autograd.grad(rms_norm(x, eps, w), inputs, dy)
    want = torch.autograd.grad(w * reference_rms_norm(x, eps), inputs, dy)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_rms_norm_low_precision_training_path():
    """bfloat16 x: normalised in float32, cast back, then scaled by the weight (transformers' Llama order)."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, 1e-6, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, w * reference_rms_norm(x.float(), 1e-6).bfloat16())
    y.float().sum().backward()
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    (wf * reference_rms_norm(xf, 1e-6)).sum().backward()
    torch.testing.assert_close(x.grad.float(), xf.grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(w.grad.float(), wf.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("needs", ["both", "x", "gate"])
@pytest.mark.parametrize("per_row_eps", [False, True])
def test_gated_rms_norm_equals_norm_then_gate(needs, per_row_eps):
    """silu(gate) * rms_norm(x): the fused Function's output and gradients equal plain autograd's."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=needs in ("both", "x"))
    gate = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=needs in ("both", "gate"))
    eps = torch.rand(2, 5, 3, 1, dtype=torch.float64) if per_row_eps else 1e-3
    torch.autograd.gradcheck(lambda a, b: gated_rms_norm(a, b, eps), (x, gate))
    want_fn = lambda a, b: torch.nn.functional.silu(b) * reference_rms_norm(a, eps)
    inputs = [t for t in (x, gate) if t.requires_grad]
    dy = torch.randn_like(x)
    torch.testing.assert_close(gated_rms_norm(x, gate, eps), want_fn(x, gate))
    got = torch.autograd.grad(gated_rms_norm(x, gate, eps), inputs, dy)
    want = torch.autograd.grad(want_fn(x, gate), inputs, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_gated_rms_norm_other_activation_and_low_precision():
    x, gate = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(
        gated_rms_norm(x, gate, 1e-6, act="gelu"),
        torch.nn.functional.gelu(gate) * reference_rms_norm(x, 1e-6),
    )
    xb, gb = x.bfloat16().requires_grad_(), gate.bfloat16().requires_grad_()
    out = gated_rms_norm(xb, gb, 1e-6)  # bfloat16: norm in float32, then the gate, as separate steps
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), gated_rms_norm(x, gate, 1e-6), atol=3e-2, rtol=3e-2)


def test_per_row_eps_folds_a_row_scale():
    """rms_norm(f * x, eps) == rms_norm(x, eps / f^2): how RetNet folds its normaliser into the group norm."""
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    f = torch.rand(4, 6, 1, dtype=torch.float64) + 0.01
    torch.testing.assert_close(rms_norm(f * x, 1e-3), rms_norm(x, 1e-3 / f.square()))


def test_rms_norm_module_weight_and_low_precision():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = norm(x)
    torch.testing.assert_close(y, norm.weight * reference_rms_norm(x, 1e-5))
    y.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    xb = x.detach().bfloat16()
    yb = norm.to(torch.bfloat16)(xb)  # computed in float32, returned in the input's dtype
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), norm.float()(xb.float()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_interleaved_rotation_complex_equals_real(dtype):
    """The complex product (float32/64) equals the real formula x cos + rotate_every_two(x) sin, with gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    angle = torch.randn(2, 9, 4, dtype=torch.float64).repeat_interleave(2, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    xd = x.to(dtype).requires_grad_()
    got = apply_rotary_interleaved(xd, cos.to(dtype), sin.to(dtype))
    want = x * cos.unsqueeze(2) + rotate_every_two(x) * sin.unsqueeze(2)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    dy = torch.randn_like(want)
    got.backward(dy.to(dtype))
    # the rotation is orthogonal: the gradient is dy rotated back by -angle
    back = dy * cos.unsqueeze(2) - rotate_every_two(dy) * sin.unsqueeze(2)
    torch.testing.assert_close(xd.grad.double(), back, atol=tol, rtol=tol)
