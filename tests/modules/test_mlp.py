"""The gated product act(a) * b: silu through a Function that recomputes silu(a) in the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from zoo.modules import GatedMLP, act_mul
from zoo.modules.mlp import activation


@pytest.mark.parametrize("needs", ["both", "a", "b"])
def test_silu_mul_gradients_equal_autograd(needs):
    torch.manual_seed(0)
    a = torch.randn(4, 9, dtype=torch.float64, requires_grad=needs in ("both", "a"))
    b = torch.randn(4, 9, dtype=torch.float64, requires_grad=needs in ("both", "b"))
    torch.autograd.gradcheck(lambda x, y: act_mul("silu", x, y), (a, b))
    d = torch.randn(4, 9, dtype=torch.float64)
    inputs = [t for t in (a, b) if t.requires_grad]
    got = torch.autograd.grad(act_mul("silu", a, b), inputs, d)
    want = torch.autograd.grad(F.silu(a) * b, inputs, d)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_silu_mul_saves_two_tensors_not_three():
    """What the memory saving rests on: only a and b are kept for the backward."""
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        act_mul("silu", a, b)
    assert len(saved) == 2
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.silu(a) * b
    assert len(saved) == 3


@pytest.mark.parametrize("act", ["gelu", "relu", "swish"])
def test_other_activations_and_no_grad(act):
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(act_mul(act, a, b), ACT2FN[act](a) * b)
    mixed = act_mul("silu", a.bfloat16().requires_grad_(), b.requires_grad_())  # mixed dtypes: plain autograd
    torch.testing.assert_close(mixed, F.silu(a.bfloat16()) * b)


def test_gated_mlp_rejects_an_unknown_activation():
    with pytest.raises(KeyError):
        GatedMLP(4, 8, act="not_an_activation")


def test_fused_gelu_new_is_the_formula_written_out():
    """``activation("gelu_new")`` (PyTorch's fused tanh GELU) computes 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715
    x^3))), BigBird's and GPT-2's activation, forward and gradient (float64)."""
    import math

    from zoo.modules.mlp import activation

    x = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
    written = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    fused = activation("gelu_new")(x)
    assert isinstance(activation("gelu_new"), torch.nn.GELU)
    assert (fused - written).abs().max() < 1e-14
    (g_written,) = torch.autograd.grad(written.sum(), x)
    (g_fused,) = torch.autograd.grad(fused.sum(), x)
    assert (g_fused - g_written).abs().max() < 1e-12


def test_activation_names_as_transformers():
    x = torch.randn(50, dtype=torch.float64)
    for name in ("gelu", "relu", "silu", "gelu_pytorch_tanh"):
        assert torch.equal(activation(name)(x), ACT2FN[name](x))
    with pytest.raises(KeyError):
        activation("no_such_activation")
