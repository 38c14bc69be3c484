"""Vector-decay linear attention (zoo.ops.gla): the oracle against the formulas; the torch and triton backends against
the oracle.

Both forms of the op: GLA (no bonus, the query reads S_t) and RWKV-6 (bonus u, the query reads S_{t-1}). torch runs
in float64 (the harness's 1e-11, elementwise max |a - b| / max |b|) and float32 (5e-5), triton in float32 (5e-5,
observed up to ~2e-6; under TRITON_INTERPRET=1 on a CPU, at small sizes since the interpreter is slow), all against
the oracle in float64: outputs, final states and the gradients of q, k, v, g, u and the initial state.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.ops import dispatch
from zoo.ops.gla import chunk, gla, gla_step, naive

from .harness import (
    TOLERANCE,
    check_forward_backward,
    check_state_chaining,
    check_step,
    check_varlen,
    rel_err,
)

# Odd head sizes on purpose.
H, DK, DV = 2, 6, 5
SEQ_DIMS = {"q": 1, "k": 1, "v": 1, "g": 1}
MODES = ["gla", "rwkv6"]
RUNS = [torch.float64, torch.float32]


def make_inputs(
    T: int,
    mode: str,
    *,
    B: int = 2,
    initial_state: bool = True,
    seed: int = 0,
    gate_scale: float = 1.0,
    dk: int = DK,
    dv: int = DV,
) -> dict:
    """float64 inputs: log decays per token and key channel as a sigmoid gate makes them (mostly mild, some near
    resets), the bonus u with ``mode == "rwkv6"``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": randn(B, T, H, dk),
        "k": randn(B, T, H, dk),
        "v": randn(B, T, H, dv),
        "g": gate_scale * F.logsigmoid(2 * randn(B, T, H, dk) + 2),
        "initial_state": randn(B, H, dk, dv) if initial_state else None,
    }
    if mode == "rwkv6":
        inputs["u"] = randn(H, dk)
    return inputs


def op(backend: str, chunk_size: int = 64, output_final_state: bool = True, **kwargs):
    return functools.partial(
        gla, backend=backend, chunk_size=chunk_size, output_final_state=output_final_state, **kwargs
    )


@pytest.mark.parametrize("mode", MODES)
def test_naive_equals_the_formula_written_out(mode):
    """The recurrence equals the unrolled sums, decays as products of per-token gates (GLA eq. 3; RWKV-6 eq. 19)."""
    inputs = make_inputs(7, mode, B=1)
    q, k, v, g, h0 = (inputs[n][0] for n in ("q", "k", "v", "g", "initial_state"))  # (T, H, D), h0 (H, K, V)
    u = inputs.get("u")
    expected = []
    for t in range(7):
        last = t if u is None else t - 1  # the last token whose decay the query sees
        o = torch.einsum("hk,hkv->hv", q[t] * torch.exp(g[: last + 1].sum(0)), h0)
        for i in range(t + 1):
            if i == t and u is not None:
                weight = u
            else:
                weight = torch.exp(g[i + 1 : last + 1].sum(0))
            o = o + torch.einsum("hk,hk,hv->hv", q[t], weight * k[i], v[i])
        expected.append(DK**-0.5 * o)
    out, _ = gla(**inputs, backend="naive")
    assert rel_err(out[0], torch.stack(expected)) < 1e-13


@pytest.mark.parametrize("dtype", RUNS, ids=["f64", "f32"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward(mode, T, chunk_size, dtype):
    """chunk 16 (one sub-chunk) and 64 (four sub-chunks of 16), dividing T or not."""
    inputs = make_inputs(T, mode)
    check_forward_backward(op("torch", chunk_size), op("naive"), inputs, dtype=dtype, what=f"{mode} T={T}")


@pytest.mark.parametrize("dtype", RUNS, ids=["f64", "f32"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "elementwise"])
@pytest.mark.parametrize("mode", MODES)
def test_sub_chunk_forms(monkeypatch, mode, split, dtype):
    """Both forms of the scores inside a sub-chunk: one matmul of split decays (every sub-chunk's decay span is
    within 2 * MAX_HALF_SPAN for these inputs) and the elementwise exponents (forced with a negative limit)."""
    inputs = make_inputs(100, mode)
    spans = -inputs["g"][:, :96].reshape(2, 6, 16, H, DK).sum(2)
    assert spans.max() < 2 * chunk.MAX_HALF_SPAN
    if not split:
        monkeypatch.setattr(chunk, "MAX_HALF_SPAN", -1.0)
    check_forward_backward(op("torch", 64), op("naive"), inputs, dtype=dtype, what=f"{mode} split={split}")


@pytest.mark.parametrize("mode", MODES)
def test_split_decays_near_the_limit_float32(mode):
    """float32, sub-chunk decay spans just under the split form's limit: log decays of -7 per token on half the
    key channels (spans of 112 over 16 tokens, factors up to e^{+-56}), keys and queries of scale 3. Outputs, final
    state and every gradient match the float64 oracle."""
    inputs = make_inputs(96, mode)
    inputs["g"][..., : DK // 2] = -7.0
    inputs["q"], inputs["k"] = 3 * inputs["q"], 3 * inputs["k"]
    spans = -inputs["g"].reshape(2, 6, 16, H, DK).sum(2)
    assert 100 < spans.max() < 2 * chunk.MAX_HALF_SPAN
    check_forward_backward(op("torch", 16), op("naive"), inputs, dtype=torch.float32, what=mode)


# (T, chunk): one token; a partial chunk; two sub-chunks per chunk; four sub-chunks with the last partial and the one
# after it empty (100 = 64 + 36)
TRITON_CASES = [(1, 16), (7, 16), (100, 32), (100, 64)]


@pytest.mark.parametrize(("T", "chunk_size"), TRITON_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_triton_forward_backward(mode, T, chunk_size):
    inputs = make_inputs(T, mode)
    check_forward_backward(
        op("triton", chunk_size), op("naive"), inputs, dtype=torch.float32, what=f"triton {mode} T={T}"
    )


@pytest.mark.parametrize("keep", [True, False], ids=["kept_states", "recomputed_states"])
@pytest.mark.parametrize("mode", MODES)
def test_triton_tiled_heads(monkeypatch, mode, keep):
    """Head sizes over one tile (Dk 20, Dv 18 in tiles of 16: two key and two value tiles, the last ones partial),
    with the per-chunk states kept for the backward or recomputed by it."""
    from zoo.ops.gla import triton as kernels

    original = kernels.launch_config
    monkeypatch.setattr(kernels, "launch_config", lambda *a: original(*a)._replace(BK=16, BV=16))
    monkeypatch.setattr(kernels, "keep_chunk_states", lambda *sizes: keep)
    inputs = make_inputs(40, mode, dk=20, dv=18)
    check_forward_backward(op("triton", 32), op("naive"), inputs, dtype=torch.float32, what=f"tiled {mode}")


@pytest.mark.parametrize("chunk_size", [24, 37, 1])
@pytest.mark.parametrize("mode", MODES)
def test_chunk_sizes(mode, chunk_size):
    """Chunks not a power of 2: 24 in sub-chunks of 12, 37 (prime) in sub-chunks of one token, and one-token chunks."""
    check_forward_backward(
        op("torch", chunk_size), op("naive"), make_inputs(80, mode), what=f"C={chunk_size}"
    )


BACKEND_DTYPE = {"torch": torch.float64, "triton": torch.float32}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_without_states(mode, backend):
    inputs = make_inputs(40, mode, initial_state=False)
    out, final = op(backend, 16, output_final_state=False)(**inputs)
    assert final is None and out.shape == (2, 40, H, DV)
    check_forward_backward(
        op(backend, 16, False), op("naive", 16, False), inputs, dtype=BACKEND_DTYPE[backend]
    )


def test_empty_sequence():
    inputs = make_inputs(0, "rwkv6")
    for backend in ("naive", "torch", "triton"):
        out, final = op(backend)(**inputs)
        assert out.shape == (2, 0, H, DV) and torch.equal(final, inputs["initial_state"])


def test_scale():
    inputs = make_inputs(20, "rwkv6")
    default, _ = gla(**inputs, backend="torch", chunk_size=8)
    ones, _ = gla(**inputs, backend="torch", chunk_size=8, scale=1.0)
    torch.testing.assert_close(default * DK**0.5, ones)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_state_chaining(backend, mode):
    inputs = make_inputs(150, mode, B=1)
    if backend == "triton":  # float32 kernels: both runs in float32
        inputs = {n: x.float() if isinstance(x, torch.Tensor) else x for n, x in inputs.items()}
    tol = TOLERANCE[torch.float32 if backend == "triton" else torch.float64]
    check_state_chaining(op(backend, 16), inputs, split=70, seq_dims=SEQ_DIMS, tol=tol)


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)],
    ids=["torch-f64", "torch-f32", "triton-f32"],
)
@pytest.mark.parametrize("mode", MODES)
def test_varlen(mode, backend, dtype):
    """Four packed sequences (lengths 17, 1, 64, 50; chunk 16) equal four separate calls, gradients included."""
    shared = make_inputs(1, mode, B=1)
    sequences = []
    for i, T in enumerate((17, 1, 64, 50)):
        seq = make_inputs(T, mode, B=1, seed=i + 1)
        if mode == "rwkv6":
            seq["u"] = shared["u"]
        sequences.append({n: x.to(dtype) for n, x in seq.items()})
    check_varlen(op(backend, 16), sequences, seq_dims=SEQ_DIMS, tol=TOLERANCE[dtype])


# With chunk 16: sequences inside one chunk, several starting in one chunk, starts on chunk boundaries, empty ones
# (first and last too), length-1 ones, ones spanning two or three chunks.
PACKED_LENGTHS = (0, 5, 1, 10, 0, 3, 3, 10, 16, 1, 30, 2, 17, 9, 0)


# triton with initial states only (the interpreter is slow; without them the kernels take a subset of the path)
@pytest.mark.parametrize(
    ("backend", "initial_state"),
    [("torch", True), ("torch", False), ("triton", True)],
    ids=["torch-h0", "torch-no_h0", "triton-h0"],
)
@pytest.mark.parametrize("mode", MODES)
def test_packed_equals_the_oracle(mode, backend, initial_state):
    inputs = make_inputs(sum(PACKED_LENGTHS), mode, B=1, initial_state=False)
    if initial_state:
        inputs["initial_state"] = torch.randn(len(PACKED_LENGTHS), H, DK, DV, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()])
    for dtype in RUNS if backend == "torch" else [torch.float32]:
        check_forward_backward(
            op(backend, 16), op("naive"), inputs, dtype=dtype, what=f"packed {backend} {dtype}"
        )
    assert op(backend, 16)(**inputs)[1].shape == (len(PACKED_LENGTHS), H, DK, DV)


@pytest.mark.parametrize("layout", ["BHD", "B1HD"])
@pytest.mark.parametrize("mode", MODES)
def test_step_equals_forward(mode, layout):
    inputs = make_inputs(40, mode)

    def step(token, state):
        q, k, v, g = (token[n] for n in ("q", "k", "v", "g"))
        if layout == "BHD":
            q, k, v, g = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
        out, state = gla_step(q, k, v, g, state, u=token.get("u"))
        return (out[:, None] if layout == "BHD" else out), state

    check_step(op("torch", 16), step, inputs, seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64])


def test_step_from_no_state_and_prefill():
    """A model's decoding: prefill in float32, then float32 steps; the first step without a state starts at zero."""
    inputs = make_inputs(30, "rwkv6", initial_state=False)
    inputs.pop("initial_state")
    full, _ = op("naive")(**inputs)
    f32 = {n: x.float() for n, x in inputs.items()}
    prefix, state = op("torch", 16)(**{**f32, **{n: f32[n][:, :20] for n in SEQ_DIMS}})
    outs = [prefix]
    for t in range(20, 30):
        out, state = gla_step(*(f32[n][:, t] for n in ("q", "k", "v", "g")), state, u=f32["u"])
        outs.append(out[:, None])
    assert rel_err(torch.cat(outs, 1), full) < 1e-5 and state.dtype == torch.float32
    token = [inputs[n][:, 0] for n in ("q", "k", "v", "g")]
    y0, s0 = gla_step(*token, u=inputs["u"])
    y1, s1 = gla_step(*token, torch.zeros(2, H, DK, DV, dtype=torch.float64), u=inputs["u"])
    assert torch.equal(y0, y1) and torch.equal(s0, s1) and s0.dtype == torch.float64


def strong_decay_inputs(T: int, mode: str) -> dict:
    """Per-channel log decays from -exp(-7) to -exp(3) per token, resets of -60 every 37 tokens on some channels,
    keys and queries of scale 10."""
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs(T, mode, B=1, seed=5)
    rates = torch.linspace(-7, 3, DK, dtype=torch.float64)
    inputs["g"] = -torch.exp(rates + 0.5 * torch.randn(1, T, H, DK, generator=gen, dtype=torch.float64))
    inputs["g"][:, ::37, :, :2] = -60.0
    inputs["q"] = 10 * inputs["q"]
    inputs["k"] = 10 * inputs["k"]
    return inputs


@pytest.mark.parametrize("mode", MODES)
def test_long_sequence_strong_decay_float32(mode):
    """T = 4096 in float32: per-channel log decays from -exp(-7) (a state living thousands of tokens) to -exp(3)
    per token, resets of -60 every 37 tokens on some channels, keys and queries of scale 10. Nothing overflows
    (every exponent of the chunked form is <= 0), and outputs, final state and every gradient match the float64
    oracle. In float32 a chunk's cumulative log decays reach about -1000 and are rounded to ~1e-4 absolute; the
    exponents taken as their differences inherit that as relative error (the recurrence in float32 loses as much),
    hence 2e-4."""
    inputs = strong_decay_inputs(4096, mode)
    errors = check_forward_backward(op("torch", 64), op("naive"), inputs, dtype=torch.float32, tol=2e-4)
    assert all(math.isfinite(e) for e in errors.values())


@pytest.mark.parametrize("mode", MODES)
def test_triton_long_sequence_strong_decay(mode):
    """The triton kernels on the same decays (T = 320 in chunks of 64: the interpreter is slow), every exponent
    masked before its exp: nothing overflows, and every output and gradient matches the float64 oracle (2e-4, the
    reason above)."""
    inputs = strong_decay_inputs(320, mode)
    errors = check_forward_backward(op("triton", 64), op("naive"), inputs, dtype=torch.float32, tol=2e-4)
    assert all(math.isfinite(e) for e in errors.values())


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv("ZOO_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())


@pytest.mark.usefixtures("fresh_dispatch")
@pytest.mark.parametrize("name", ["naive", "torch", "triton"])
def test_routes_to_the_chosen_backend(monkeypatch, name):
    from zoo.ops.gla import triton as triton_impl

    calls = []
    forms = (
        ("naive", naive, "naive_recurrent_gla"),
        ("torch", chunk, "chunk_gla"),
        ("triton", triton_impl, "triton_gla"),
    )
    for form, module, attr in forms:
        original = getattr(module, attr)

        def spy(*args, _form=form, _original=original, **kwargs):
            calls.append(_form)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)
    inputs = make_inputs(5, "gla")
    gla(**inputs, backend=name, chunk_size=16)
    monkeypatch.setenv("ZOO_BACKEND", name)
    gla(**inputs, chunk_size=16)
    assert calls == [name, name]


def test_triton_runs_the_torch_form_for_other_chunk_sizes(monkeypatch, caplog):
    """Chunk sizes the kernels cannot take (not a power of 2 >= 16) run the torch form, with a warning naming it."""
    calls = []
    original = chunk.chunk_gla
    monkeypatch.setattr(
        chunk, "chunk_gla", lambda *a, **kw: calls.append(kw["chunk_size"]) or original(*a, **kw)
    )
    inputs = make_inputs(30, "rwkv6")
    with caplog.at_level("WARNING", logger="zoo.ops.gla"):
        out, _ = gla(**inputs, backend="triton", chunk_size=24)
    assert calls == [24] and "chunk_size a power of 2 >= 16, got 24" in caplog.text
    assert rel_err(out, gla(**inputs, backend="naive")[0]) < 1e-11


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": torch.zeros(2, 6, H, dtype=torch.float64)}, r"q has shape .*\[B, T, H, K\]"),
        ({"k": torch.zeros(2, 6, H, DK + 1, dtype=torch.float64)}, "k has shape"),
        ({"g": torch.zeros(2, 6, H, dtype=torch.float64)}, "g has shape"),
        ({"v": torch.zeros(2, 6, H + 1, DV, dtype=torch.float64)}, "v has shape"),
        ({"u": torch.zeros(H, DK + 1, dtype=torch.float64)}, r"u has shape .*\[H, K\]"),
        ({"v": torch.zeros(2, 6, H, DV)}, "v has dtype"),
        ({"g": torch.zeros(2, 6, H, DK, dtype=torch.int64)}, "g has dtype"),
        (
            {"initial_state": torch.zeros(2, H, DV, DK, dtype=torch.float64)},
            r"initial_state has shape .*\[N, H, K, V\]",
        ),
        ({"cu_seqlens": torch.tensor([0, 3, 6])}, "B == 1"),
    ],
)
def test_invalid_arguments(change, message):
    inputs = {**make_inputs(6, "rwkv6"), **change}
    with pytest.raises(ValueError, match=message):
        gla(**inputs, backend="torch")


def test_invalid_packing_and_steps():
    inputs = make_inputs(6, "gla", B=1, initial_state=False)
    with pytest.raises(ValueError, match="cu_seqlens runs from 0 to 5"):
        gla(**inputs, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="decreases"):
        gla(**inputs, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(
        ValueError, match=r"initial_state has shape \(1, 2, 6, 5\), expected \[N, H, K, V\]=\[2"
    ):
        gla(**{**inputs, "initial_state": torch.zeros(1, H, DK, DV)}, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="chunk_size=0"):
        gla(**inputs, chunk_size=0)
    token = [inputs[n][:, 0] for n in ("q", "k", "v", "g")]
    with pytest.raises(ValueError, match="state has shape"):
        gla_step(*token, torch.zeros(1, H, DK, DV + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="q has shape"):
        gla_step(inputs["q"], *token[1:])
