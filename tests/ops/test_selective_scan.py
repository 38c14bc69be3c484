"""Selective scan (zoo.ops.selective_scan): the torch and triton backends against the naive oracle.

torch runs in float64 and float32; triton (its forward and backward kernels, under the CPU interpreter) in float32,
at smaller sizes than torch (the interpreter walks the kernels' loops over time in Python). Errors are max |a - b| / max |b| over all elements (``max_rel``): below 1e-10
for float64 runs and 1e-5 for float32 runs, both against the oracle in float64; the harness's checks (state
chaining, packed sequences, step decoding) use the same tolerances.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.ops import dispatch
from zoo.ops.selective_scan import chunk, naive, selective_scan, selective_scan_step

from .harness import check_state_chaining, check_step, check_varlen, clone_inputs

DC, N = 6, 4  # 6 channels: two groups of 3
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# (backend, dtype) runs; the Triton kernel computes in float32
RUNS = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)]
RUN_IDS = ["torch-f64", "torch-f32", "triton-f32"]
TORCH_RUNS, TORCH_RUN_IDS = RUNS[:2], RUN_IDS[:2]
SEQ_DIMS = {"x": 1, "dt": 1, "B": 1, "C": 1, "z": 1}


def make_inputs(
    T: int,
    *,
    batch: int = 2,
    groups: int | None = 2,
    D: bool = True,
    z: bool = True,
    dt_bias: bool = True,
    softplus: bool = True,
    initial_state: bool = True,
    seed: int = 0,
) -> dict:
    """float64 inputs as a Mamba layer makes them: A = -exp(A_log), raw dt through softplus (or positive dt)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (batch, T, N) if groups is None else (batch, T, groups, N)
    dt = randn(batch, T, DC) * 0.5 - 1.0  # softplus: steps of about 0.1 to 1
    return {
        "x": randn(batch, T, DC),
        "dt": dt if softplus else F.softplus(dt),
        "A": -torch.exp(randn(DC, N) * 0.5),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(DC) if D else None,
        "z": randn(batch, T, DC) if z else None,
        "dt_bias": randn(DC) * 0.5 if dt_bias else None,
        "initial_state": randn(batch, DC, N) if initial_state else None,
    }


def op(backend: str, chunk_size: int = 64, softplus: bool = True, output_final_state: bool = True):
    return functools.partial(
        selective_scan,
        backend=backend,
        chunk_size=chunk_size,
        dt_softplus=softplus,
        output_final_state=output_final_state,
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
    """``fn`` in ``dtype`` against ``ref`` in float64: every output and the gradient of every floating input,
    through a fixed random projection of all outputs."""
    ref_in, fn_in = clone_inputs(inputs, torch.float64), clone_inputs(inputs, dtype)
    ref_out, fn_out = ref(**ref_in), fn(**fn_in)
    errors = {}
    gen = torch.Generator().manual_seed(1234)
    weights = [
        None if o is None else torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref_out
    ]
    for i, (a, b) in enumerate(zip(fn_out, ref_out)):
        assert (a is None) == (b is None), f"{what}: output {i} is None in one form only"
        if b is not None:
            errors[f"out{i}"] = max_rel(a, b)
    leaves = [n for n, x in ref_in.items() if isinstance(x, torch.Tensor) and x.requires_grad]

    def grads(run_in, run_out):
        loss = sum((o.double() * w).sum() for o, w in zip(run_out, weights) if o is not None)
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


# ------------------------------------------------------------------------------------------- the oracle


def test_naive_equals_the_formula_written_out():
    """Two tokens, two channels, two states, every option on: the recurrence in scalar Python arithmetic."""
    x = [[0.5, -1.0], [2.0, 0.25]]  # [t][d]
    dt_raw = [[0.1, -0.3], [0.7, 0.2]]
    dt_bias = [0.05, -0.1]
    A = [[-1.0, -0.5], [-2.0, -0.25]]  # [d][n]
    B = [[0.3, -0.7], [1.1, 0.4]]  # [t][n]
    C = [[-0.2, 0.9], [0.6, -1.3]]
    D = [0.4, -0.8]
    z = [[1.5, -0.5], [0.3, 2.0]]
    h0 = [[0.2, -0.1], [0.5, 0.3]]  # [d][n]
    h = [row[:] for row in h0]
    expected = []
    for t in range(2):
        y_t = []
        for d in range(2):
            dt = math.log1p(math.exp(dt_raw[t][d] + dt_bias[d]))
            for n in range(2):
                h[d][n] = math.exp(dt * A[d][n]) * h[d][n] + dt * B[t][n] * x[t][d]
            y = sum(C[t][n] * h[d][n] for n in range(2)) + D[d] * x[t][d]
            y_t.append(y * z[t][d] / (1 + math.exp(-z[t][d])))
        expected.append(y_t)

    def tensor(v):
        return torch.tensor(v, dtype=torch.float64)

    y, final = selective_scan(
        tensor([x]), tensor([dt_raw]), tensor(A), tensor([B]), tensor([C]), tensor(D), tensor([z]),
        dt_bias=tensor(dt_bias), dt_softplus=True, initial_state=tensor([h0]), output_final_state=True,
        backend="naive",
    )  # fmt: skip
    assert max_rel(y, tensor([expected])) < 1e-14
    assert max_rel(final, tensor([h])) < 1e-14


# ------------------------------------------------------------------------------------------- torch vs naive


@pytest.mark.parametrize(("backend", "dtype"), TORCH_RUNS, ids=TORCH_RUN_IDS)
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 63, 64, 200])
def test_forward_backward(T, chunk_size, backend, dtype):
    """Everything on (grouped B/C, D, z, dt_bias, softplus, initial and final state); chunk 16 divides 64 only,
    chunk 64 divides 64 and exceeds 1, 7 and 63."""
    inputs = make_inputs(T)
    check_against(op(backend, chunk_size), op("naive"), inputs, dtype, what=f"T={T} chunk={chunk_size}")


@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "raw_dt"])
@pytest.mark.parametrize("extras", [True, False], ids=["D_z_bias", "plain"])
@pytest.mark.parametrize("groups", [None, 1, 2], ids=["BC", "G1", "G2"])
def test_options(groups, extras, softplus):
    """B/C shared ([B, T, N]) or grouped (G = 1, 2); with and without D, z and dt_bias; dt through softplus or
    used as given."""
    inputs = make_inputs(50, groups=groups, D=extras, z=extras, dt_bias=extras, softplus=softplus)
    for backend, dtype in TORCH_RUNS:
        fn, ref = op(backend, 16, softplus), op("naive", softplus=softplus)
        check_against(fn, ref, inputs, dtype, what=f"{backend} {dtype}")


@pytest.mark.parametrize(("T", "chunk_size"), [(100, 24), (200, 50), (9, 1), (5, 3), (30, 1000)])
def test_chunk_sizes(T, chunk_size):
    """Chunk sizes that are not powers of 2, of one token, and longer than the sequence."""
    check_against(op("torch", chunk_size), op("naive"), make_inputs(T), torch.float64)
    if T <= 30:
        check_against(op("triton", chunk_size), op("naive"), make_inputs(T, batch=1), torch.float32)


@pytest.mark.parametrize(("backend", "dtype"), RUNS, ids=RUN_IDS)
def test_without_states(backend, dtype):
    """No initial state in, no final state out."""
    T = 20 if backend == "triton" else 40
    inputs = make_inputs(T, initial_state=False)
    y, final = op(backend, 16, output_final_state=False)(**inputs)
    assert final is None and y.shape == (2, T, DC)
    no_state = op(backend, 16, output_final_state=False)
    check_against(no_state, op("naive", output_final_state=False), inputs, dtype)


def test_empty_sequence():
    """T = 0: an empty output, and the initial state passed on as the final one."""
    inputs = make_inputs(0)
    for backend in ("naive", "torch", "triton"):
        y, final = op(backend)(**inputs)
        assert y.shape == (2, 0, DC)
        torch.testing.assert_close(final, inputs["initial_state"])


@pytest.mark.parametrize(("backend", "dtype"), RUNS, ids=RUN_IDS)
def test_strong_decay_stays_finite(backend, dtype):
    """dt A down to about -1000 per token (a trained Mamba's large-dt resets): no overflow, no nan."""
    inputs = make_inputs(40 if backend == "triton" else 100, batch=1)
    inputs["dt"][:, ::5] = 8.0  # softplus(8 + bias) ~ 8
    inputs["A"][:, -1] = -120.0
    errors = check_against(op(backend, 64), op("naive"), inputs, dtype)
    assert all(math.isfinite(e) for e in errors.values())


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_gradcheck(packed):
    """torch.autograd.gradcheck of the hand-written backward on tiny float64 inputs (chunks of 2)."""
    inputs = make_inputs(5, batch=1)
    cu_seqlens = None
    if packed:
        cu_seqlens = torch.tensor([0, 2, 2, 5])
        inputs["initial_state"] = torch.randn(3, DC, N, dtype=torch.float64)
    names = [n for n, x in inputs.items() if x is not None]
    leaves = [inputs[n].clone().requires_grad_() for n in names]

    def fn(*tensors):
        return op("torch", 2)(**dict(zip(names, tensors)), cu_seqlens=cu_seqlens)

    assert torch.autograd.gradcheck(fn, leaves)


# ------------------------------------------------------------------------------------------- Triton vs naive
# The Triton forward and backward kernels under the CPU interpreter, in float32 against the oracle in float64, at
# T <= 40 (the interpreter walks every token of the kernels' loops in Python).


@pytest.mark.parametrize(
    ("T", "chunk_size", "batch"),
    [(1, 64, 2), (7, 16, 2), (40, 16, 1), (37, 8, 1), (40, 64, 1)],
)
def test_triton_forward_backward(T, chunk_size, batch):
    """Everything on (grouped B/C, D, z, dt_bias, softplus, initial and final state): one token; a sequence
    inside one chunk; chunks that divide T and that do not; one chunk holding the whole sequence. The backward
    recomputes every chunk's states from the state the forward stored for it."""
    inputs = make_inputs(T, batch=batch)
    check_against(
        op("triton", chunk_size), op("naive"), inputs, torch.float32, what=f"T={T} chunk={chunk_size}"
    )


@pytest.mark.parametrize(
    ("groups", "extras", "softplus"),
    [(None, True, True), (None, False, False), (1, True, False), (2, False, True), (3, True, True)],
    ids=["BC-all", "BC-plain", "G1-raw_dt", "G2-plain", "G3-all"],
)
def test_triton_options(groups, extras, softplus):
    """B/C shared or grouped (G = 1, 2, 3: blocks of channels that do not fill the kernel's block); with and
    without D, z and dt_bias; dt through softplus or as given."""
    inputs = make_inputs(20, batch=1, groups=groups, D=extras, z=extras, dt_bias=extras, softplus=softplus)
    fn, ref = op("triton", 8, softplus), op("naive", softplus=softplus)
    check_against(fn, ref, inputs, torch.float32, what=f"groups={groups} extras={extras} softplus={softplus}")


def test_triton_gradient_of_the_final_state_only():
    """A loss on the final state alone (the gradient entering the backward at the last token; C, D and z do not
    reach it) gives every input it depends on, the initial state included, the oracle's gradient."""
    inputs = make_inputs(13, batch=1, D=False, z=False)
    names = ["x", "dt", "A", "B", "dt_bias", "initial_state"]
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("naive", torch.float64)):
        leaves = clone_inputs(inputs, dtype)
        _, final = op(backend, 4)(**leaves)
        grads[backend] = torch.autograd.grad(final.sin().sum(), [leaves[n] for n in names])
    errors = {n: max_rel(a, b) for n, a, b in zip(names, grads["triton"], grads["naive"])}
    assert all(e < TOL[torch.float32] for e in errors.values()), errors


# ------------------------------------------------------------------------------------------- states, packing, steps


@pytest.mark.parametrize(("backend", "dtype"), [("naive", torch.float64), *RUNS], ids=["naive", *RUN_IDS])
def test_state_chaining(backend, dtype):
    """[0, 70) then [70, 150) from the first part's final state equals the whole."""
    inputs = {n: x if x is None else x.to(dtype) for n, x in make_inputs(150, batch=1).items()}
    check_state_chaining(op(backend, 16), inputs, split=70, seq_dims=SEQ_DIMS, tol=TOL[dtype], what=backend)


@pytest.mark.parametrize(("backend", "dtype"), [("naive", torch.float64), *RUNS], ids=["naive", *RUN_IDS])
def test_varlen(backend, dtype):
    """Four packed sequences (lengths 17, 1, 64, 50; chunk 16; triton: 9, 1, 20, 5) equal four separate calls,
    gradients included."""
    shared = make_inputs(1, batch=1)
    sequences = []
    for i, T in enumerate((9, 1, 20, 5) if backend == "triton" else (17, 1, 64, 50)):
        seq = make_inputs(T, batch=1, seed=i + 1)
        seq.update({n: shared[n] for n in ("A", "D", "dt_bias")})
        sequences.append({n: x if x is None else x.to(dtype) for n, x in seq.items()})
    check_varlen(op(backend, 16), sequences, seq_dims=SEQ_DIMS, tol=TOL[dtype], what=backend)


# With chunk 16: sequences shorter than a chunk, several starting in one chunk, starts at chunk boundaries (16,
# 32, 48), empty ones (also first and last), length-1 ones, ones spanning two or three chunks.
PACKED_LENGTHS = (0, 5, 1, 10, 0, 3, 3, 10, 16, 1, 30, 2, 17, 9, 0)


# The same cases for the Triton kernels with chunk 8, in fewer tokens: starts at 16 and 32, sequences across 8, 24
# and 32, empty ones first and last.
PACKED_LENGTHS_SHORT = (0, 5, 1, 10, 0, 3, 8, 1, 4, 0)


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize(("backend", "dtype"), RUNS, ids=RUN_IDS)
def test_packed_equals_the_oracle(backend, dtype, initial_state):
    """One pass over packed sequences (empty ones included) against the oracle run sequence by sequence."""
    lengths, chunk_size = (PACKED_LENGTHS_SHORT, 8) if backend == "triton" else (PACKED_LENGTHS, 16)
    inputs = make_inputs(sum(lengths), batch=1, initial_state=False)
    if initial_state:
        inputs["initial_state"] = torch.randn(len(lengths), DC, N, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    check_against(op(backend, chunk_size), op("naive"), inputs, dtype)
    _, final = op(backend, chunk_size)(**inputs)
    assert final.shape == (len(lengths), DC, N)


@pytest.mark.parametrize("layout", ["BD", "B1D"])
@pytest.mark.parametrize("groups", [None, 2], ids=["BC", "G2"])
def test_step_equals_forward(groups, layout):
    """Decoding token by token with selective_scan_step equals the chunked forward, outputs and final state."""
    inputs = make_inputs(40, groups=groups)

    def step(token, state):
        if layout == "BD":
            token = {n: x if x is None or x.dim() < 3 else x[:, 0] for n, x in token.items()}
        args = {n: token[n] for n in ("x", "dt", "A", "B", "C", "D", "z")}
        y, state = selective_scan_step(**args, state=state, dt_bias=token["dt_bias"], dt_softplus=True)
        return (y[:, None] if layout == "BD" else y), state

    check_step(op("torch", 16), step, inputs, seq_dims=SEQ_DIMS, tol=TOL[torch.float64])


def test_step_from_no_state_and_prefill():
    """A model's decoding: prefill in float32 with the triton kernel, then steps from its state; the first step
    without a state starts from zeros."""
    inputs = make_inputs(30, initial_state=False)
    full, _ = op("naive")(**inputs)
    f32 = {n: x if x is None else x.float() for n, x in inputs.items()}
    params = {n: f32[n] for n in ("A", "D")}
    prefix, state = op("triton", 16)(**{**f32, **{n: f32[n][:, :20] for n in SEQ_DIMS}})
    assert state.dtype == torch.float32
    outs = [prefix]
    for t in range(20, 30):
        token = {n: f32[n][:, t] for n in SEQ_DIMS}
        y, state = selective_scan_step(
            **token, **params, state=state, dt_bias=f32["dt_bias"], dt_softplus=True
        )
        outs.append(y[:, None])
    assert max_rel(torch.cat(outs, 1), full) < 1e-5
    token = {n: inputs[n][:, 0] for n in SEQ_DIMS}
    args = {**token, "A": inputs["A"], "D": inputs["D"], "dt_bias": inputs["dt_bias"], "dt_softplus": True}
    y0, s0 = selective_scan_step(**args)
    y1, s1 = selective_scan_step(**args, state=torch.zeros(2, DC, N, dtype=torch.float64))
    assert torch.equal(y0, y1) and torch.equal(s0, s1) and s0.dtype == torch.float64


# ------------------------------------------------------------------------------------------- memory, dtypes, dispatch


def test_backward_keeps_no_state_per_token():
    """What autograd keeps for the backward is a few times the inputs, not one (Dc, N) state per token: the
    chunk states (T / L of them) are saved, the states inside a chunk are recomputed."""
    T, Dc, chunk_size = 512, 32, 64
    gen = torch.Generator().manual_seed(0)
    x, dt, z = (torch.randn(1, T, Dc, generator=gen, requires_grad=True) for _ in range(3))
    A = (-torch.rand(Dc, 16, generator=gen)).requires_grad_()
    B, C = (torch.randn(1, T, 16, generator=gen, requires_grad=True) for _ in range(2))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = selective_scan(x, dt, A, B, C, z=z, dt_softplus=True, chunk_size=chunk_size, backend="torch")
    y.sum().backward()
    per_token_states = T * Dc * 16 * 4
    assert sum(saved) < per_token_states / 2, (
        f"saved {sum(saved)} bytes, one state per token is {per_token_states}"
    )


def test_low_precision_inputs():
    """bfloat16 in, bfloat16 out, float32 state; close to the float32 result at bfloat16's resolution."""
    inputs = make_inputs(33)
    bf16 = {
        n: x if x is None else (x.float() if n == "initial_state" else x.bfloat16())
        for n, x in inputs.items()
    }
    y, state = op("torch", 16)(**bf16)
    ref, ref_state = op("naive")(**{n: x if x is None else x.float() for n, x in bf16.items()})
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert max_rel(y, ref) < 2e-2 and max_rel(state, ref_state) < 1e-5


@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv("ZOO_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())


@pytest.mark.usefixtures("fresh_dispatch")
@pytest.mark.parametrize("name", ["naive", "torch", "triton"])
def test_routes_to_the_chosen_backend(monkeypatch, name):
    """The backend= argument and ZOO_BACKEND reach the form dispatch picked."""
    from zoo.ops.selective_scan import triton as triton_impl

    calls = []
    for form, module, attr in (
        ("naive", naive, "naive_selective_scan"),
        ("torch", chunk, "chunk_selective_scan"),
        ("triton", triton_impl, "triton_selective_scan"),
    ):
        original = getattr(module, attr)

        def spy(*args, _form=form, _original=original, **kwargs):
            calls.append(_form)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)
    inputs = make_inputs(5)
    selective_scan(**inputs, backend=name)
    monkeypatch.setenv("ZOO_BACKEND", name)
    selective_scan(**inputs)
    assert calls == [name, name]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(2, 6)}, r"x has shape \(2, 6\), expected \[B, T, Dc\]"),
        ({"dt": torch.zeros(2, 6, DC + 1, dtype=torch.float64)}, "dt has shape"),
        ({"A": torch.zeros(DC + 1, N, dtype=torch.float64)}, "A has shape"),
        ({"B": torch.zeros(2, 6, N + 1, dtype=torch.float64)}, "B has shape"),
        ({"B": torch.zeros(2, 6, 4, N, dtype=torch.float64)}, "divisible by G"),
        ({"C": torch.zeros(2, 6, N, dtype=torch.float64)}, "C has shape"),
        ({"D": torch.zeros(DC + 1, dtype=torch.float64)}, "D has shape"),
        ({"dt_bias": torch.zeros(1, dtype=torch.float64)}, "dt_bias has shape"),
        ({"z": torch.zeros(2, 5, DC, dtype=torch.float64)}, "z has shape"),
        ({"x": torch.zeros(2, 6, DC, dtype=torch.int64)}, "x has dtype"),
        (
            {"initial_state": torch.zeros(2, N, DC, dtype=torch.float64)},
            r"initial_state has shape .*\[B, Dc, N\]",
        ),
        ({"cu_seqlens": torch.tensor([0, 3, 6])}, "B == 1"),
    ],
)
def test_invalid_arguments(change, message):
    inputs = {**make_inputs(6), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs, backend="torch")


def test_invalid_packing_and_steps():
    inputs = make_inputs(6, batch=1, initial_state=False)
    with pytest.raises(ValueError, match="cu_seqlens runs from 0 to 5"):
        selective_scan(**inputs, cu_seqlens=torch.tensor([0, 2, 5]), backend="torch")
    with pytest.raises(
        ValueError, match=r"initial_state has shape \(1, 6, 4\), expected \[N_seq, Dc, N\]=\[2"
    ):
        selective_scan(
            **{**inputs, "initial_state": torch.zeros(1, DC, N)}, cu_seqlens=torch.tensor([0, 2, 6])
        )
    with pytest.raises(ValueError, match="chunk_size=0"):
        selective_scan(**inputs, chunk_size=0)
    token = {n: inputs[n][:, 0] for n in ("x", "dt", "B", "C")}
    with pytest.raises(ValueError, match="state has shape"):
        selective_scan_step(**token, A=inputs["A"], state=torch.zeros(1, DC, N + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has shape"):
        selective_scan_step(**{**token, "x": inputs["x"]}, A=inputs["A"])
