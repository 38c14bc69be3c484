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


def _written_out_mlp(mlp, x):
    """down(act(up x)), or down(act(gate x) * up x) for the gated MLP, with the layers' weights, by F.linear."""
    up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    hidden = mlp.act_fn(up)
    if hasattr(mlp, "gate_proj"):
        hidden = mlp.act_fn(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)) * up
    return F.linear(hidden, mlp.down_proj.weight, mlp.down_proj.bias)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["all", "x", "weights"])
def test_mlp_in_row_blocks_equals_the_written_out_mlp(monkeypatch, gated, act, bias, needs):
    """From ``MLP_BLOCKED_FROM`` on (lowered here), the plain and the gated MLP run a block of 4 rows at a time (23
    rows: a last block of 3): output and the gradients of x and of every weight and bias equal the written-out
    MLP's, in float64."""
    from zoo.modules import mlp as mlp_module

    monkeypatch.setattr(mlp_module, "MLP_BLOCKED_FROM", 1)
    monkeypatch.setattr(mlp_module, "MLP_BLOCK_ELEMENTS", 4 * 12)
    torch.manual_seed(0)
    kind = mlp_module.GatedMLP if gated else mlp_module.MLP
    mlp = kind(6, 12, act=act, bias=bias).double()
    x = torch.randn(1, 23, 6, dtype=torch.float64)
    x.requires_grad_(needs in ("all", "x"))
    for p in mlp.parameters():
        p.requires_grad_(needs in ("all", "weights"))
    assert mlp.runs_blocked(x)
    assert len(mlp_module.row_blocks(23, 12, block_elements=mlp_module.MLP_BLOCK_ELEMENTS)) == 6
    d = torch.randn(1, 23, 6, dtype=torch.float64)
    inputs = [t for t in (x, *mlp.parameters()) if t.requires_grad]
    got = mlp(x)
    assert got.grad_fn.name().endswith("_RowBlockedMLPBackward")
    want = _written_out_mlp(mlp, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, inputs, d), torch.autograd.grad(want, inputs, d)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gated", [False, True])
def test_mlp_runs_blocked_only_where_it_can(monkeypatch, gated):
    """Row blocks need a CPU, gradients, plain nn.Linear layers (a peft wrapper or a hook must see its call) and a
    large enough input; otherwise the MLP runs as its modules."""
    from zoo.modules import mlp as mlp_module

    mlp = (mlp_module.GatedMLP if gated else mlp_module.MLP)(8, 32)
    x = torch.randn(1, 512, 8, requires_grad=True)
    monkeypatch.setattr(mlp_module, "MLP_BLOCKED_FROM", 512 * 32)
    assert mlp.runs_blocked(x)
    assert not mlp.runs_blocked(x[:, :511])  # below the threshold
    with torch.no_grad():
        assert not mlp.runs_blocked(x)
    assert not mlp.to(torch.bfloat16).runs_blocked(x.detach().bfloat16().requires_grad_())  # 16-bit: whole
    mlp.float()
    assert mlp.runs_blocked(x)
    frozen = x.detach()
    for p in mlp.parameters():
        p.requires_grad_(False)
    assert not mlp.runs_blocked(frozen)  # nothing needs a gradient
    for p in mlp.parameters():
        p.requires_grad_(True)
    handle = mlp.up_proj.register_forward_hook(lambda *args: None)
    assert not mlp.runs_blocked(x)
    handle.remove()

    class Wrapped(torch.nn.Linear):
        pass

    mlp.down_proj = Wrapped(32, 8)
    assert not mlp.runs_blocked(x)


def test_mlp_with_lora_adapters_is_not_blocked(monkeypatch):
    """peft's LoRA wraps the projections: the MLP then runs them as modules, so the adapters take part (their
    gradients are not zero), even where the input is past ``MLP_BLOCKED_FROM``."""
    from peft import LoraConfig, get_peft_model

    from zoo.modules import mlp as mlp_module

    monkeypatch.setattr(mlp_module, "MLP_BLOCKED_FROM", 1)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp_module.GatedMLP(8, 16)

        def forward(self, x):
            return self.mlp(x)

    torch.manual_seed(0)
    model = get_peft_model(Holder(), LoraConfig(r=2, target_modules=["up_proj", "down_proj"], init_lora_weights=False))
    x = torch.randn(1, 5, 8)
    assert not model.base_model.model.mlp.runs_blocked(x)
    model(x).sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
