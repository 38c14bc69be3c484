"""WKV4 (zoo.ops.wkv4): the oracle against transformers and the paper's formula; the torch and triton backends
against the oracle.

torch runs in float64 (the harness's 1e-11, elementwise max |a - b| / max |b|) and float32 (5e-5), triton (forward and
backward kernels) in float32 (5e-5; under TRITON_INTERPRET=1 on a CPU), all against the oracle in float64: the
outputs, the final (numerator, denominator, max) state, and the gradients of w, u, k, v and the initial state.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from zoo.ops import dispatch
from zoo.ops.wkv4 import chunk, naive, wkv4, wkv4_step

from .harness import (
    TOLERANCE,
    check_forward_backward,
    check_state_chaining,
    check_step,
    check_varlen,
    rel_err,
)

C = 5
SEQ_DIMS = {"k": 1, "v": 1}
RUNS = [torch.float64, torch.float32]
BACKEND_DTYPE = {"naive": torch.float64, "torch": torch.float64, "triton": torch.float32}


def make_inputs(
    T: int, *, B: int = 2, initial_state: bool = True, key_scale: float = 1.0, seed: int = 0
) -> dict:
    """float64 inputs as an RWKV-4 layer makes them: w = -exp(time_decay) over weak and strong decays."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    h0 = None
    if initial_state:  # a numerator of any sign, a positive denominator, a max of the size of the keys
        h0 = torch.stack(
            [randn(B, C), torch.rand(B, C, generator=gen, dtype=torch.float64) + 0.5, randn(B, C)], 1
        )
    return {
        "w": -torch.exp(torch.linspace(-3, 2, C, dtype=torch.float64)),
        "u": randn(C),
        "k": key_scale * randn(B, T, C),
        "v": randn(B, T, C),
        "initial_state": h0,
    }


def op(backend: str, chunk_size: int = 16, output_final_state: bool = True):
    return functools.partial(
        wkv4, backend=backend, chunk_size=chunk_size, output_final_state=output_final_state
    )


def test_naive_equals_the_formula_written_out():
    """The max-tracking recurrence equals eq. 14 of the paper as plain sums of exponentials (float64, keys small
    enough not to overflow), the initial state entering as e^max (num, den) decayed by t w."""
    inputs = make_inputs(9, B=1)
    w, u, k, v, h0 = (inputs[n][0] if n in ("k", "v", "initial_state") else inputs[n] for n in inputs)
    num0, den0, max0 = h0
    expected = []
    for t in range(9):
        num = math.e**max0 * num0 * torch.exp(t * w) + torch.exp(u + k[t]) * v[t]
        den = math.e**max0 * den0 * torch.exp(t * w) + torch.exp(u + k[t])
        for i in range(t):
            num = num + torch.exp((t - 1 - i) * w + k[i]) * v[i]
            den = den + torch.exp((t - 1 - i) * w + k[i])
        expected.append(num / den)
    out, state = wkv4(**inputs, output_final_state=True, backend="naive")
    assert rel_err(out[0], torch.stack(expected)) < 1e-13
    real_num = math.e**max0 * num0 * torch.exp(9 * w) + sum(
        torch.exp((8 - i) * w + k[i]) * v[i] for i in range(9)
    )
    assert rel_err(state[0, 0] * torch.exp(state[0, 2]), real_num) < 1e-13
    # the max it tracks is the largest exponent of those sums (equal up to the rounding of the summed decays)
    largest = torch.maximum(max0 + 9 * w, ((8 - torch.arange(9))[:, None] * w + k).amax(0))
    assert rel_err(state[0, 2], largest) < 1e-14


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_equals_transformers(backend):
    """transformers' ``rwkv_linear_attention_cpu`` (time_decay raw, its state a list [num, den, max]): the same
    outputs and states, from an initial state and from none. It computes in float32, hence 1e-5."""
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    inputs = {n: x.float() for n, x in make_inputs(40, key_scale=3.0).items()}
    time_decay = torch.log(-inputs["w"])
    for h0 in (inputs["initial_state"], None):
        state_list = None if h0 is None else list(h0.unbind(1))
        ref, ref_state = rwkv_linear_attention_cpu(
            time_decay, inputs["u"], inputs["k"], inputs["v"], state=state_list, return_state=True
        )
        out, state = op(backend, 16)(**{**inputs, "initial_state": h0})
        assert rel_err(out, ref) < 1e-5 and rel_err(state, torch.stack(ref_state, 1)) < 1e-5


@pytest.mark.parametrize("dtype", RUNS, ids=["f64", "f32"])
@pytest.mark.parametrize("chunk_size", [2, 5, 16, None])
@pytest.mark.parametrize("T", [1, 7, 16, 63, 100])
def test_forward_backward(T, chunk_size, dtype):
    """Outputs, final state, and every gradient (w, u, k, v, initial state); chunk 16 divides 16 only, chunk 5
    divides none of the odd lengths, chunk 2 makes up to 50 chunks (six steps of the scan over chunks), None is
    the default choice."""
    inputs = make_inputs(T, key_scale=3.0)
    check_forward_backward(
        op("torch", chunk_size), op("naive"), inputs, dtype=dtype, what=f"T={T} C={chunk_size}"
    )


@pytest.mark.parametrize("T", [1, 7, 100])
def test_triton_forward_backward(T):
    """The Triton forward and its reverse walk: outputs, final state and every gradient."""
    inputs = make_inputs(T, key_scale=3.0)
    check_forward_backward(op("triton"), op("naive"), inputs, dtype=torch.float32, what=f"triton T={T}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_of_one_output_only(backend):
    """A loss on the outputs alone (no gradient reaches the final state) and one on the final state alone (none
    reaches the outputs, the max component included): the gradients (torch: its hand-written backward, chunk 5
    leaving a remainder) equal the oracle's."""
    inputs = make_inputs(12, key_scale=3.0)
    for which in (0, 1):
        grads = {}
        for form, dtype in (("naive", torch.float64), (backend, torch.float32)):
            leaves = {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}
            result = op(form, 5)(**leaves)[which]
            weight = torch.linspace(-1, 1, result.numel(), dtype=torch.float64).view(result.shape)
            loss = (result.double() * weight).sum()
            found = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            # the final state does not depend on u: no gradient, or a zero one
            grads[form] = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves.values(), found)]
        for name, a, b in zip(inputs, grads[backend], grads["naive"]):
            assert rel_err(a, b) < TOLERANCE[torch.float32], (which, name)
        assert (
            grads["naive"][1].abs().max() > 0
            if which == 0
            else torch.equal(grads[backend][1], 0 * inputs["u"].float())
        )


def test_triton_max_ties_split_the_gradient():
    """Where the decayed max equals the key exactly (max + w == k_t), the new max's gradient goes half to each side,
    as the oracle's torch.maximum sends it."""
    inputs = make_inputs(3, B=1, key_scale=3.0)
    inputs["w"] = -torch.tensor([1.0, 0.5, 2.0, 0.25, 4.0], dtype=torch.float64)
    inputs["initial_state"][:, 2] = torch.tensor([2.0, 1.0, 3.0, -1.0, 0.5], dtype=torch.float64)
    inputs["k"][:, 0] = (
        inputs["initial_state"][:, 2] + inputs["w"]
    )  # a tie on every channel, exact in float32
    check_forward_backward(op("triton"), op("naive"), inputs, dtype=torch.float32, what="ties")


def test_triton_wide_channels():
    """More channels than one program's block (300 = 128 + 128 + 44): blocks side by side, the last one partial."""
    gen = torch.Generator().manual_seed(11)
    Cw = 300
    inputs = {
        "w": -torch.exp(torch.linspace(-3, 2, Cw, dtype=torch.float64)),
        "u": torch.randn(Cw, generator=gen, dtype=torch.float64),
        "k": 3 * torch.randn(2, 9, Cw, generator=gen, dtype=torch.float64),
        "v": torch.randn(2, 9, Cw, generator=gen, dtype=torch.float64),
        "initial_state": torch.stack(
            [
                torch.randn(2, Cw, generator=gen, dtype=torch.float64),
                torch.rand(2, Cw, generator=gen, dtype=torch.float64) + 0.5,
                torch.randn(2, Cw, generator=gen, dtype=torch.float64),
            ],
            1,
        ),
    }
    check_forward_backward(op("triton", 4), op("naive"), inputs, dtype=torch.float32, what="300 channels")


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)],
    ids=["torch-f64", "torch-f32", "triton-f32"],
)
def test_without_states(backend, dtype):
    inputs = make_inputs(40, initial_state=False)
    out, final = op(backend, output_final_state=False)(**inputs)
    assert final is None and out.shape == (2, 40, C)
    check_forward_backward(op(backend, 16, False), op("naive", 16, False), inputs, dtype=dtype)
    # and the final state starting from the empty one (max -1e38)
    check_forward_backward(op(backend, 16), op("naive"), inputs, dtype=dtype)


def test_empty_sequence():
    inputs = make_inputs(0)
    for backend in ("naive", "torch", "triton"):
        out, final = op(backend)(**inputs)
        assert out.shape == (2, 0, C) and torch.equal(final, inputs["initial_state"])


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_state_chaining(backend):
    inputs = make_inputs(150, B=1, key_scale=3.0)
    dtype = BACKEND_DTYPE[backend]
    inputs = {n: x.to(dtype) for n, x in inputs.items()}
    check_state_chaining(op(backend, 16), inputs, split=70, seq_dims=SEQ_DIMS, tol=TOLERANCE[dtype])


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)],
    ids=["torch-f64", "torch-f32", "triton-f32"],
)
def test_varlen(backend, dtype):
    """Four packed sequences (lengths 17, 1, 32, 50; chunk 16) equal four separate calls, gradients included."""
    shared = make_inputs(1, B=1)
    sequences = []
    for i, T in enumerate((17, 1, 32, 50)):
        seq = make_inputs(T, B=1, seed=i + 1)
        seq.update(w=shared["w"], u=shared["u"])
        sequences.append({n: x.to(dtype) for n, x in seq.items()})
    check_varlen(op(backend, 16), sequences, seq_dims=SEQ_DIMS, tol=TOLERANCE[dtype])


# With chunk 8: sequences inside one chunk, several starting in one chunk, starts on chunk boundaries, empty ones
# (first and last too), length-1 ones, ones spanning several chunks.
PACKED_LENGTHS = (0, 3, 1, 4, 0, 8, 13, 1, 2, 20, 0)


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize(
    ("backend", "dtype", "chunk_size"),
    [
        ("torch", torch.float64, 8),
        ("torch", torch.float64, 3),
        ("torch", torch.float32, 8),
        ("triton", torch.float32, 8),
    ],
    ids=["torch-f64", "torch-f64-chunk3", "torch-f32", "triton-f32"],
)
def test_packed_equals_the_oracle(backend, dtype, initial_state, chunk_size):
    """Chunk 3 as well: documents start and end in more chunks, so the scan over chunks restarts more often (the
    triton form has no chunks)."""
    inputs = make_inputs(sum(PACKED_LENGTHS), B=1, initial_state=False, key_scale=3.0)
    if initial_state:
        inputs["initial_state"] = make_inputs(1, B=len(PACKED_LENGTHS), seed=7)["initial_state"]
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()])
    check_forward_backward(op(backend, chunk_size), op("naive"), inputs, dtype=dtype)
    assert op(backend, chunk_size)(**inputs)[1].shape == (len(PACKED_LENGTHS), 3, C)


@pytest.mark.parametrize("layout", ["BC", "B1C"])
def test_step_equals_forward(layout):
    inputs = make_inputs(40, key_scale=3.0)

    def step(token, state):
        k, v = token["k"], token["v"]
        if layout == "BC":
            k, v = k[:, 0], v[:, 0]
        out, state = wkv4_step(token["w"], token["u"], k, v, state)
        return (out[:, None] if layout == "BC" else out), state

    check_step(op("torch", 16), step, inputs, seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64])


def test_step_from_no_state_and_prefill():
    """A model's decoding: prefill in float32, then float32 steps; the first step without a state starts empty."""
    inputs = make_inputs(30, initial_state=False)
    full, _ = op("naive")(**inputs)
    f32 = {n: x.float() for n, x in inputs.items() if x is not None}
    prefix, state = op("torch", 8)(**{**f32, "k": f32["k"][:, :20], "v": f32["v"][:, :20]})
    outs = [prefix]
    for t in range(20, 30):
        out, state = wkv4_step(f32["w"], f32["u"], f32["k"][:, t], f32["v"][:, t], state)
        outs.append(out[:, None])
    assert rel_err(torch.cat(outs, 1), full) < 1e-5 and state.dtype == torch.float32
    args = (inputs["w"], inputs["u"], inputs["k"][:, 0], inputs["v"][:, 0])
    y0, s0 = wkv4_step(*args)
    y1, s1 = wkv4_step(*args, naive.empty_state(2, C, torch.float64, torch.device("cpu")))
    assert torch.equal(y0, y1) and torch.equal(s0, s1) and s0.dtype == torch.float64


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_long_sequence_strong_decay_large_keys_float32(backend):
    """T = 4096 in float32: decays from -exp(-6) (a state living thousands of tokens) to -exp(5) (gone after one
    token), keys up to +-80 (e^80 overflows no float32 product here: every exponent is shifted by its max). Outputs,
    final state and every gradient stay finite and match the float64 oracle. The triton kernels walk the recurrence
    (forward and back) in float32, as the paper's kernel does, and lose what that loses: the oracle's own recurrence
    run in float32 is off by 5.8e-5 in the output and 1.9e-4 in dk here (its max accumulates w token after token),
    the triton kernels by the same, hence 3e-4 for them."""
    gen = torch.Generator().manual_seed(3)
    T, Cl = 4096, 6
    k = 20 * torch.randn(1, T, Cl, generator=gen, dtype=torch.float64)
    k[:, ::97] = 80.0
    k[:, 5::89] = -80.0
    inputs = {
        "w": -torch.exp(torch.tensor([-6.0, -3.0, -1.0, 0.0, 2.0, 5.0], dtype=torch.float64)),
        "u": 5 * torch.randn(Cl, generator=gen, dtype=torch.float64),
        "k": k,
        "v": torch.randn(1, T, Cl, generator=gen, dtype=torch.float64),
        "initial_state": torch.tensor([[[1.0] * Cl, [2.0] * Cl, [30.0] * Cl]], dtype=torch.float64),
    }
    errors = check_forward_backward(
        op(backend, 16),
        op("naive"),
        inputs,
        dtype=torch.float32,
        tol=3e-4 if backend == "triton" else None,
        what=f"{backend} T=4096",
    )
    assert all(math.isfinite(e) for e in errors.values())


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv("ZOO_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())


@pytest.mark.usefixtures("fresh_dispatch")
@pytest.mark.parametrize("name", ["naive", "torch", "triton"])
def test_routes_to_the_chosen_backend(monkeypatch, name):
    from zoo.ops.wkv4 import triton as triton_impl

    calls = []
    forms = (
        ("naive", naive, "naive_wkv4"),
        ("torch", chunk, "chunk_wkv4"),
        ("triton", triton_impl, "triton_wkv4"),
    )
    for form, module, attr in forms:
        original = getattr(module, attr)

        def spy(*args, _form=form, _original=original, **kwargs):
            calls.append(_form)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)
    inputs = make_inputs(5)
    wkv4(**inputs, backend=name)
    monkeypatch.setenv("ZOO_BACKEND", name)
    wkv4(**inputs)
    assert calls == [name, name]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": torch.zeros(2, 6)}, r"k has shape \(2, 6\), expected \[B, T, C\]"),
        ({"v": torch.zeros(2, 6, C + 1, dtype=torch.float64)}, "v has shape"),
        ({"w": torch.zeros(C + 1, dtype=torch.float64)}, r"w has shape .*\[C\]"),
        ({"u": torch.zeros(1, C, dtype=torch.float64)}, "u has shape"),
        ({"k": torch.zeros(2, 6, C, dtype=torch.int64)}, "k has dtype"),
        (
            {"initial_state": torch.zeros(2, C, 3, dtype=torch.float64)},
            r"initial_state has shape .*\[N, 3, C\]",
        ),
        ({"cu_seqlens": torch.tensor([0, 3, 6])}, "B == 1"),
    ],
)
def test_invalid_arguments(change, message):
    inputs = {**make_inputs(6), **change}
    with pytest.raises(ValueError, match=message):
        wkv4(**inputs, backend="torch")


def test_invalid_packing_and_steps():
    inputs = make_inputs(6, B=1, initial_state=False)
    with pytest.raises(ValueError, match="cu_seqlens runs from 0 to 5"):
        wkv4(**inputs, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="decreases"):
        wkv4(**inputs, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 3, 5\), expected \[N, 3, C\]=\[2"):
        wkv4(**{**inputs, "initial_state": torch.zeros(1, 3, C)}, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="chunk_size=0"):
        wkv4(**inputs, chunk_size=0)
    w, u, k = inputs["w"], inputs["u"], inputs["k"]
    with pytest.raises(ValueError, match="state has shape"):
        wkv4_step(w, u, k[:, 0], k[:, 0], torch.zeros(1, 3, C + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="k has shape"):
        wkv4_step(w, u, k, k)
