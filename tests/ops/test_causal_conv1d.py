"""Causal conv1d (zoo.ops.causal_conv1d): the F.conv1d and Triton backends against the naive oracle and nn.Conv1d.

Errors are max |a - b| / max |b| over all elements: below 1e-10 for float64 runs and 1e-5 for float32 runs, both
against the oracle in float64. The harness's checks (state chaining, packed sequences, step decoding) use its
norm-wise relative error under the same tolerances.
"""

from __future__ import annotations

import functools

import pytest
import torch

from zoo.ops import dispatch
from zoo.ops.causal_conv1d import causal_conv1d, causal_conv1d_step

from .harness import check_state_chaining, check_step, check_varlen, clone_inputs

C = 5
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SEQ_DIMS = {"x": 1}


def make_inputs(T: int, *, K: int = 4, batch: int = 2, bias: bool = True, initial_state: bool = True, seed=0):
    """float64 inputs for ``causal_conv1d``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "x": randn(batch, T, C),
        "weight": randn(C, K),
        "bias": randn(C) if bias else None,
        "initial_state": randn(batch, C, K - 1) if initial_state else None,
    }


def op(backend: str, activation: str | None = "silu", output_final_state: bool = True):
    return functools.partial(
        causal_conv1d, backend=backend, activation=activation, output_final_state=output_final_state
    )


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (plain max |a - b| when b is zero)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def check_against(fn, ref, inputs: dict, dtype: torch.dtype, what: str = "") -> dict[str, float]:
    """``fn`` in ``dtype`` against ``ref`` in float64: both outputs and the gradient of every floating input."""
    ref_in, fn_in = clone_inputs(inputs, torch.float64), clone_inputs(inputs, dtype)
    ref_out, fn_out = ref(**ref_in), fn(**fn_in)
    gen = torch.Generator().manual_seed(1234)
    weights = [
        None if o is None else torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref_out
    ]
    errors = {}
    for i, (a, b) in enumerate(zip(fn_out, ref_out)):
        assert (a is None) == (b is None), f"{what}: output {i} is None in one form only"
        if b is not None:
            errors[f"out{i}"] = max_rel(a, b)
    leaves = [n for n, x in ref_in.items() if isinstance(x, torch.Tensor) and x.requires_grad]

    def grads(run_in, run_out):
        loss = sum((o.double() * w).sum() for o, w in zip(run_out, weights) if o is not None and o.numel())
        return dict(zip(leaves, torch.autograd.grad(loss, [run_in[n] for n in leaves], allow_unused=True)))

    fn_grads, ref_grads = grads(fn_in, fn_out), grads(ref_in, ref_out)
    for name in leaves:
        a, b = fn_grads[name], ref_grads[name]
        assert a is not None and b is not None, f"{what}: no gradient for {name}"
        assert a.dtype == fn_in[name].dtype, (
            f"{what}: d{name} has dtype {a.dtype}, its input {fn_in[name].dtype}"
        )
        errors[f"d{name}"] = max_rel(a, b)
    tol = TOL[dtype]
    bad = sorted(n for n, e in errors.items() if not e < tol)
    summary = ", ".join(f"{n}={e:.1e}" for n, e in errors.items())
    assert not bad, f"{what}: max-abs relative error over {tol:.0e} for {bad} ({summary})"
    return errors


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_equals_nn_conv1d(backend, K):
    """The convention of transformers' MambaMixer: nn.Conv1d(C, C, K, groups=C, padding=K - 1) on (B, C, T), its
    first T outputs, with weight[:, None, :]; weight[:, -1] multiplies the current token."""
    inputs = make_inputs(30, K=K, initial_state=False)
    conv = torch.nn.Conv1d(C, C, K, groups=C, padding=K - 1, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(inputs["weight"][:, None, :])
        conv.bias.copy_(inputs["bias"])
        expected = conv(inputs["x"].transpose(1, 2))[..., :30].transpose(1, 2)
    y, _ = causal_conv1d(inputs["x"], inputs["weight"], inputs["bias"], backend=backend)
    assert max_rel(y, expected) < 1e-14
    y_silu, _ = causal_conv1d(
        inputs["x"], inputs["weight"], inputs["bias"], activation="silu", backend=backend
    )
    assert max_rel(y_silu, torch.nn.functional.silu(expected)) < 1e-14


def test_naive_equals_the_sum_written_out():
    """One channel, K = 3, a history of two inputs: y_t = w0 x_{t-2} + w1 x_{t-1} + w2 x_t + b."""
    x = torch.tensor([[[1.0], [2.0], [-1.0]]], dtype=torch.float64)  # (1, 3, 1)
    w = torch.tensor([[0.5, -2.0, 3.0]], dtype=torch.float64)
    h0 = torch.tensor([[[4.0, -3.0]]], dtype=torch.float64)  # x_{-2}, x_{-1}
    y, final = causal_conv1d(
        x, w, torch.tensor([0.25]).double(), initial_state=h0, output_final_state=True, backend="naive"
    )
    expected = [0.5 * 4 - 2 * -3 + 3 * 1, 0.5 * -3 - 2 * 1 + 3 * 2, 0.5 * 1 - 2 * 2 + 3 * -1]
    assert y.flatten().tolist() == [e + 0.25 for e in expected]
    assert final.flatten().tolist() == [2.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("T", [1, 2, 7, 63, 64, 200])
def test_forward_backward(T, activation, dtype):
    """Output, final state and the gradients of x, weight, bias and the initial state (T = 1, 2 are shorter than
    the K - 1 = 3 steps of history: the final state then reaches into the initial one)."""
    check_against(op("torch", activation), op("naive", activation), make_inputs(T), dtype, what=f"T={T}")


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("rows", [1, 2, 3, 16], ids=lambda r: f"rows{r}")
def test_backward_in_blocks_of_rows(monkeypatch, rows, activation, K):
    """The torch backward runs a block of rows at a time, from the last: with blocks of 1-16 rows (fewer rows than
    the filter's K - 1 steps of history, and a last block shorter than the others), the output, final state and
    every gradient equal the oracle."""
    from zoo.ops import blocking

    monkeypatch.setattr(blocking, "BLOCK_ELEMENTS", rows * 2 * C)  # make_inputs' batch of 2
    inputs = make_inputs(37, K=K)
    check_against(op("torch", activation), op("naive", activation), inputs, torch.float64, what=f"rows={rows}")


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_empty_sequence(backend, K):
    """T = 0: an empty output, and the initial state (or zeros) passed on as the final one, packed too."""
    inputs = make_inputs(0, K=K)
    y, final = op(backend)(**inputs)
    assert y.shape == (2, 0, C) and torch.equal(final, inputs["initial_state"])
    packed = {**make_inputs(0, K=K, batch=1, initial_state=False), "cu_seqlens": torch.tensor([0, 0, 0])}
    y, final = op(backend)(**packed)
    assert y.shape == (1, 0, C) and torch.equal(final, torch.zeros(2, C, K - 1, dtype=torch.float64))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_kernel_sizes_without_bias_or_state(K):
    inputs = make_inputs(20, K=K, bias=False, initial_state=False)
    check_against(op("torch"), op("naive"), inputs, torch.float64, what=f"K={K}")


def test_swish_is_silu_and_unknown_activations_raise():
    inputs = make_inputs(9)
    torch.testing.assert_close(op("torch", "swish")(**inputs)[0], op("torch", "silu")(**inputs)[0])
    with pytest.raises(ValueError, match=r"activation='relu', expected one of \(None, 'silu', 'swish'\)"):
        op("torch", "relu")(**inputs)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_gradcheck(packed):
    """torch.autograd.gradcheck of the F.conv1d form on tiny float64 inputs."""
    inputs = make_inputs(6, batch=1)
    cu_seqlens = None
    if packed:
        cu_seqlens = torch.tensor([0, 1, 1, 6])
        inputs["initial_state"] = torch.randn(3, C, 3, dtype=torch.float64)
    names = list(inputs)
    leaves = [inputs[n].clone().requires_grad_() for n in names]

    def fn(*tensors):
        return op("torch")(**dict(zip(names, tensors)), cu_seqlens=cu_seqlens)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("K", [1, 4])
def test_strided_slice_of_a_wider_input(K, dtype):
    """x a slice of a wider projection (rows not contiguous, as Mamba-2's in_proj hands it) and a transposed
    initial state: output, final state and every gradient against the oracle on contiguous inputs."""

    def strided(x, weight, bias, initial_state):
        wide_x = torch.cat([torch.zeros_like(x), x, torch.zeros_like(x)], dim=-1)[..., C : 2 * C]
        h0 = initial_state.transpose(1, 2).contiguous().transpose(1, 2)
        assert not wide_x.is_contiguous() and (K == 1 or not h0.is_contiguous())
        return op("torch")(wide_x, weight, bias, initial_state=h0)

    check_against(strided, op("naive"), make_inputs(37, K=K), dtype, what=f"strided K={K}")


@pytest.mark.parametrize("leaf", ["x", "weight", "bias", "initial_state"])
def test_gradient_of_one_input_at_a_time(leaf):
    """Only one input requires a gradient (the others frozen): that gradient equals the oracle's."""
    inputs = make_inputs(13)
    grads = {}
    for backend in ("torch", "naive"):
        run = {n: x.clone().requires_grad_(n == leaf) for n, x in inputs.items()}
        y, final = op(backend)(**run)
        loss = (
            y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
        ).sum() + final.square().sum()
        grads[backend] = torch.autograd.grad(loss, run[leaf])[0]
    assert max_rel(grads["torch"], grads["naive"]) < TOL[torch.float64]


@pytest.mark.parametrize("split", [2, 70])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_state_chaining(backend, split):
    """[0, split) then the rest from the first part's final state equals the whole (split 2 < K - 1)."""
    for dtype in (torch.float64, torch.float32):
        inputs = {n: x.to(dtype) for n, x in make_inputs(100).items()}
        check_state_chaining(
            op(backend), inputs, split=split, seq_dims=SEQ_DIMS, tol=TOL[dtype], what=backend
        )


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_varlen(backend):
    """Four packed sequences (lengths 17, 1, 64, 2) equal four separate calls, gradients included."""
    shared = make_inputs(1, batch=1)
    for dtype in (torch.float64, torch.float32):
        sequences = []
        for i, T in enumerate((17, 1, 64, 2)):
            seq = {**make_inputs(T, batch=1, seed=i + 1), "weight": shared["weight"], "bias": shared["bias"]}
            sequences.append({n: x.to(dtype) for n, x in seq.items()})
        check_varlen(op(backend), sequences, seq_dims=SEQ_DIMS, tol=TOL[dtype], what=backend)


PACKED_LENGTHS = (0, 5, 1, 2, 0, 3, 10, 1, 30, 0)


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_packed_equals_the_oracle(dtype, initial_state):
    """Packed sequences (empty ones, and ones shorter than the history, included) in one convolution against the
    oracle run sequence by sequence; no sequence sees the previous one's inputs."""
    inputs = make_inputs(sum(PACKED_LENGTHS), batch=1, initial_state=False)
    if initial_state:
        inputs["initial_state"] = torch.randn(len(PACKED_LENGTHS), C, 3, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()])
    check_against(op("torch"), op("naive"), inputs, dtype)


def test_packed_sequences_do_not_see_each_other():
    """Changing one sequence's inputs leaves every other sequence's outputs and final state unchanged."""
    inputs = make_inputs(12, batch=1, initial_state=False)
    cu = torch.tensor([0, 4, 5, 12])
    y, final = op("torch")(**inputs, cu_seqlens=cu)
    inputs["x"][:, :5] += 100.0
    y2, final2 = op("torch")(**inputs, cu_seqlens=cu)
    assert torch.equal(y[:, 5:], y2[:, 5:]) and torch.equal(final[2], final2[2])


@pytest.mark.parametrize("layout", ["BC", "B1C"])
def test_step_equals_forward(layout):
    """Decoding token by token with causal_conv1d_step equals the full forward, outputs and final state."""
    inputs = make_inputs(20)

    def step(token, state):
        x = token["x"][:, 0] if layout == "BC" else token["x"]
        y, state = causal_conv1d_step(x, token["weight"], token["bias"], state, activation="silu")
        return (y[:, None] if layout == "BC" else y), state

    check_step(op("torch"), step, inputs, seq_dims=SEQ_DIMS, tol=TOL[torch.float64])


def test_step_from_no_state():
    """No state: zeros, as at the start of a sequence; the new state has the dtype of x."""
    inputs = make_inputs(3, initial_state=False)
    full, _ = op("naive")(**inputs)
    state = None
    for t in range(3):
        y, state = causal_conv1d_step(
            inputs["x"][:, t], inputs["weight"], inputs["bias"], state, activation="silu"
        )
        assert max_rel(y, full[:, t]) < 1e-14
    assert state.dtype == torch.float64 and state.shape == (2, C, 3)


def test_low_precision_inputs():
    """bfloat16 in, bfloat16 out and state; close to the float32 result at bfloat16's resolution."""
    inputs = {n: x.bfloat16() for n, x in make_inputs(33).items()}
    y, state = op("torch")(**inputs)
    ref, _ = op("naive")(**{n: x.float() for n, x in inputs.items()})
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    assert max_rel(y, ref) < 2e-2 and torch.equal(state, inputs["x"][:, -3:].transpose(1, 2))


@pytest.mark.parametrize("name", ["naive", "torch", "triton"])
def test_routes_to_the_chosen_backend(monkeypatch, name):
    """The backend= argument and ZOO_BACKEND reach the form dispatch picked (triton: the Triton kernels)."""
    from zoo.ops.causal_conv1d import chunk, naive
    from zoo.ops.causal_conv1d import triton as triton_impl

    monkeypatch.delenv("ZOO_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    calls = []
    for form, module, attr in (
        ("naive", naive, "naive_causal_conv1d"),
        ("torch", chunk, "chunk_causal_conv1d"),
        ("triton", triton_impl, "triton_causal_conv1d"),
    ):
        original = getattr(module, attr)

        def spy(*args, _form=form, _original=original, **kwargs):
            calls.append(_form)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)
    inputs = make_inputs(5)
    op(name)(**inputs)
    monkeypatch.setenv("ZOO_BACKEND", name)
    causal_conv1d(**inputs)
    assert calls == [name, name]


# ------------------------------------------------------------------------------------------- Triton kernels
# Under the CPU interpreter (tests/conftest.py), at small sizes; float64 runs compute in float64, float32 runs in
# float32, both against the oracle in float64.


@pytest.mark.parametrize(
    ("T", "K", "activation", "bias", "initial_state"),
    [
        (1, 4, "silu", True, True),  # shorter than the history: the final state reaches into the initial one
        (2, 3, None, False, True),
        (37, 4, "silu", True, True),  # more than one block of tokens, not a multiple of it
        (33, 2, None, True, False),
        (19, 3, "silu", False, False),
        (9, 1, "silu", True, False),  # no history at all
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_triton_forward_backward(dtype, T, K, activation, bias, initial_state):
    """The Triton kernels against the oracle: output, final state, and the gradients of x, weight, bias and the
    initial state; widths 1 to 4, with and without SiLU, bias and initial state."""
    inputs = make_inputs(T, K=K, bias=bias, initial_state=initial_state)
    what = f"T={T} K={K} {activation} bias={bias} h0={initial_state}"
    check_against(op("triton", activation), op("naive", activation), inputs, dtype, what=what)


def test_triton_only_output_or_only_state():
    """A loss on y alone (no final state asked for), and one on the final state alone (which reaches x and the
    initial state only), both against the oracle."""
    inputs = make_inputs(11, K=3)
    no_state = op("triton", output_final_state=False)
    check_against(no_state, op("naive", output_final_state=False), inputs, torch.float64)
    grads = {}
    for backend in ("triton", "naive"):
        leaves = clone_inputs(make_inputs(2, K=4))
        _, final = op(backend)(**leaves)
        grads[backend] = torch.autograd.grad(final.sin().sum(), [leaves["x"], leaves["initial_state"]])
    for a, b in zip(grads["triton"], grads["naive"]):
        assert max_rel(a, b) < TOL[torch.float64]


@pytest.mark.parametrize("split", [2, 23])
def test_triton_state_chaining(split):
    """[0, split) then the rest from the first part's final state equals the whole (split 2 < K - 1)."""
    for dtype in (torch.float64, torch.float32):
        inputs = {n: x.to(dtype) for n, x in make_inputs(40).items()}
        check_state_chaining(
            op("triton"), inputs, split=split, seq_dims=SEQ_DIMS, tol=TOL[dtype], what="triton"
        )


def test_triton_varlen():
    """Four packed sequences (lengths 17, 1, 20, 2) equal four separate calls, gradients included."""
    shared = make_inputs(1, batch=1)
    sequences = []
    for i, T in enumerate((17, 1, 20, 2)):
        seq = {**make_inputs(T, batch=1, seed=i + 1), "weight": shared["weight"], "bias": shared["bias"]}
        sequences.append(seq)
    check_varlen(op("triton"), sequences, seq_dims=SEQ_DIMS, tol=TOL[torch.float64], what="triton")


@pytest.mark.parametrize(("K", "activation"), [(4, "silu"), (2, None)])
@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
def test_triton_packed_equals_the_oracle(initial_state, K, activation):
    """Packed sequences (empty ones, and ones shorter than the history, included) against the oracle run sequence
    by sequence: outputs, final states and every gradient."""
    lengths = (0, 5, 1, 2, 0, 3, 10, 1, 14, 0)
    inputs = make_inputs(sum(lengths), K=K, batch=1, initial_state=False)
    if initial_state:
        inputs["initial_state"] = torch.randn(len(lengths), C, K - 1, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    for dtype in (torch.float64, torch.float32):
        check_against(op("triton", activation), op("naive", activation), inputs, dtype, what=f"K={K}")


def test_triton_low_precision_inputs():
    """bfloat16 in, bfloat16 out and state (float32 sums); close to the float32 result at bfloat16's resolution."""
    inputs = {n: x.bfloat16() for n, x in make_inputs(33).items()}
    y, state = op("triton")(**inputs)
    ref, _ = op("naive")(**{n: x.float() for n, x in inputs.items()})
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    assert max_rel(y, ref) < 2e-2 and torch.equal(state, inputs["x"][:, -3:].transpose(1, 2))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(2, 6)}, r"x has shape \(2, 6\), expected \[B, T, C\]"),
        ({"weight": torch.zeros(C + 1, 4, dtype=torch.float64)}, "weight has shape"),
        ({"weight": torch.zeros(C, dtype=torch.float64)}, "weight has shape"),
        ({"bias": torch.zeros(C + 1, dtype=torch.float64)}, "bias has shape"),
        ({"x": torch.zeros(2, 6, C, dtype=torch.int64)}, "x has dtype"),
        (
            {"initial_state": torch.zeros(2, C, 4, dtype=torch.float64)},
            r"initial_state has shape .*\[B, C, K - 1\]",
        ),
        ({"cu_seqlens": torch.tensor([0, 3, 6])}, "B == 1"),
    ],
)
def test_invalid_arguments(change, message):
    inputs = {**make_inputs(6), **change}
    with pytest.raises(ValueError, match=message):
        causal_conv1d(**inputs, backend="torch")


def test_invalid_packing_and_steps():
    inputs = make_inputs(6, batch=1, initial_state=False)
    with pytest.raises(ValueError, match="cu_seqlens runs from 0 to 5"):
        causal_conv1d(**inputs, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(
        ValueError, match=r"initial_state has shape \(1, 5, 3\), expected \[N_seq, C, K - 1\]"
    ):
        causal_conv1d(**{**inputs, "initial_state": torch.zeros(1, C, 3)}, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="state has shape"):
        causal_conv1d_step(
            inputs["x"][:, 0], inputs["weight"], state=torch.zeros(1, C, 4, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="x has shape"):
        causal_conv1d_step(inputs["x"], inputs["weight"])
