"""The delta rule family (zoo.ops.delta_rule): the chunked torch form and the Triton kernels against the naive
oracle, via harness.py, and the DeltaNet / Gated DeltaNet wrappers against the papers' equations written out here.

torch runs in float64 against the float64 oracle (harness tolerance 1e-11, elementwise max |a - b| / max |b|) and
in float32 (harness tolerance 5e-5); triton in float32 (5e-5; under TRITON_INTERPRET=1 on a CPU, so at small sizes). Inputs are shaped as RWKV-7 makes them: a = -κ̂ and b = κ̂ * iclr with κ̂ a
unit vector and iclr in (0, 1), log-decays g = -exp(-0.5) sigmoid(.) ... down to strong ones.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.ops import dispatch
from zoo.ops.delta_rule import delta_rule, delta_rule_step, dplr_delta_rule, dplr_delta_rule_step

from .harness import (
    TOLERANCE,
    check_forward_backward,
    check_state_chaining,
    check_step,
    check_varlen,
    rel_err,
)

# Odd head sizes on purpose (no power-of-2 assumption on Dk, Dv).
H, DK, DV = 2, 6, 5
SEQ_DIMS = {"q": 1, "k": 1, "v": 1, "a": 1, "b": 1, "g": 1}


def make_inputs(
    T: int,
    *,
    B: int = 2,
    initial_state: bool = True,
    decay: str = "rwkv7",
    seed: int = 0,
    dk: int = DK,
    dv: int = DV,
) -> dict[str, torch.Tensor | None]:
    """float64 inputs for ``dplr_delta_rule`` as RWKV-7 makes them; the harness casts them per run.

    ``decay``: "rwkv7" (w = exp(-e^{-0.5} sigmoid(x)), the paper's range), "mixed" (from none to e^-3 per token),
    "strong" (as "mixed", plus channels decaying by e^-30 per token for stretches of tokens).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    kappa = F.normalize(randn(B, T, H, dk), dim=-1)  # κ̂, unit per head
    iclr = torch.sigmoid(randn(B, T, H, dk))
    if decay == "rwkv7":
        g = -math.exp(-0.5) * torch.sigmoid(randn(B, T, H, dk))
    else:
        g = -torch.exp(2 * randn(B, T, H, dk) - 2).clamp(max=3.0)
        if decay == "strong":
            g[:, 5:40:3, :, : dk // 2] = -30.0
            g[:, 100:130, :, -1] = -30.0
    return {
        "q": randn(B, T, H, dk),
        "k": randn(B, T, H, dk),
        "v": randn(B, T, H, dv),
        "a": -kappa,
        "b": kappa * iclr,
        "g": g,
        "initial_state": randn(B, H, dk, dv) if initial_state else None,
    }


def op(backend: str, chunk_size: int = 64, output_final_state: bool = True, **kwargs):
    return functools.partial(
        dplr_delta_rule,
        backend=backend,
        chunk_size=chunk_size,
        output_final_state=output_final_state,
        **kwargs,
    )


def naive_op(output_final_state: bool = True):
    return op("naive", output_final_state=output_final_state)


# ------------------------------------------------------------------------------------------- the oracle


def test_naive_equals_the_formula_written_out():
    """Two tokens, Dk = 2, Dv = 2, every element in scalar Python arithmetic, in the paper's orientation
    S (Dv x Dk): S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, o_t = scale S_t q_t; the stored state is S^T."""
    q = [[0.5, -1.0], [2.0, 0.25]]  # [t][key channel]
    k = [[0.3, -0.7], [1.1, 0.4]]
    v = [[-0.2, 0.9], [0.6, -1.3]]  # [t][value channel]
    a = [[-0.6, 0.8], [0.28, -0.96]]
    b = [[0.3, -0.2], [-0.1, 0.5]]
    g = [[-0.1, -2.0], [-0.5, -0.05]]
    S = [[0.2, -0.1], [0.5, 0.3]]  # S[value][key]
    scale = 0.7
    expected = []
    for t in range(2):
        transition = [
            [(math.exp(g[t][i]) if i == j else 0.0) + a[t][i] * b[t][j] for j in range(2)] for i in range(2)
        ]
        S = [
            [sum(S[r][m] * transition[m][c] for m in range(2)) + v[t][r] * k[t][c] for c in range(2)]
            for r in range(2)
        ]
        expected.append([scale * sum(S[r][c] * q[t][c] for c in range(2)) for r in range(2)])

    def tensor(x):
        return torch.tensor(x, dtype=torch.float64)[None, :, None]  # (B=1, T, H=1, D)

    h0 = torch.tensor([[0.2, -0.1], [0.5, 0.3]], dtype=torch.float64).T[None, None]  # stored (Dk, Dv)
    for backend in ("naive", "torch"):
        out, final = dplr_delta_rule(
            tensor(q), tensor(k), tensor(v), tensor(a), tensor(b), tensor(g), scale=scale, initial_state=h0,
            output_final_state=True, backend=backend, chunk_size=2,
        )  # fmt: skip
        assert rel_err(out, tensor(expected)) < 1e-14, backend
        assert rel_err(final[0, 0], torch.tensor(S, dtype=torch.float64).T) < 1e-14, backend


# ------------------------------------------------------------------------------------------- torch vs naive


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 63, 64, 200])
def test_forward_backward(T, chunk_size):
    """Output, final state and the gradient of q, k, v, a, b, g and the initial state, in float64."""
    check_forward_backward(op("torch", chunk_size), naive_op(), make_inputs(T), what=f"T={T} C={chunk_size}")


@pytest.mark.parametrize("decay", ["rwkv7", "mixed", "strong"])
def test_forward_backward_float32(decay):
    """float32 against the float64 oracle, from RWKV-7's mild decays to channels decaying by e^-30 per token."""
    inputs = make_inputs(150, decay=decay)
    check_forward_backward(op("torch", 32), naive_op(), inputs, dtype=torch.float32, what=decay)


@pytest.mark.parametrize(("T", "chunk_size"), [(9, 1), (30, 2), (45, 8), (100, 32), (30, 128)])
def test_chunk_sizes(T, chunk_size):
    """Chunks of one token, of a few, and longer than the sequence."""
    inputs = make_inputs(T, decay="mixed")
    check_forward_backward(op("torch", chunk_size), naive_op(), inputs, what=f"T={T} C={chunk_size}")


def test_per_head_decay_and_no_states():
    """g [B, T, H] (one decay per head, broadcast over the key channels); no initial state in, none out."""
    inputs = make_inputs(40, initial_state=False)
    inputs["g"] = inputs["g"][..., 0]
    out, final = op("torch", 16, output_final_state=False)(**inputs)
    assert final is None and out.shape == (2, 40, H, DV)
    no_state = op("torch", 16, output_final_state=False)
    check_forward_backward(no_state, naive_op(output_final_state=False), inputs)


@pytest.mark.parametrize("form", ["one matmul", "levelled"])
def test_pair_matrix_forms_float32(monkeypatch, form):
    """Both forms of the pair matrices (one matmul of split decays where every chunk's decay span is at most
    MAX_SPAN, else the levels), forced in turn on the same inputs, in float32 against the float64 oracle: decays
    up to e^-3 per token, chunk spans just under MAX_SPAN."""
    from zoo.ops.delta_rule import chunk

    inputs = make_inputs(100, decay="mixed", seed=4)
    inputs["g"] = inputs["g"].clamp(min=-2.4)  # spans of 16 tokens <= 38.4 < MAX_SPAN
    assert float((-inputs["g"]).sum(1).max()) > chunk.MAX_SPAN  # the sequence as a whole spans more
    if form == "levelled":
        monkeypatch.setattr(chunk, "MAX_SPAN", 0.0)
    check_forward_backward(op("torch", 16), naive_op(), inputs, dtype=torch.float32, what=form)


@contextlib.contextmanager
def _route(taken: list):
    """Records, per call of the chunked form, whether its forward-only route produced the result."""
    from zoo.ops.delta_rule import chunk

    original = chunk._forward_only

    def spy(*args, **kwargs):
        found = original(*args, **kwargs)
        taken.append(found is not None)
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunk, "_forward_only", spy)
        yield


def _forward_only(fn, inputs):
    """``fn`` under torch.no_grad, which takes the chunked form's forward-only route."""
    with torch.no_grad():
        return fn(**inputs)


@pytest.mark.parametrize(
    ("T", "B", "chunk_size", "scale"),
    [
        (1, 2, 16, None),
        (7, 1, 16, 1.0),
        (64, 2, 16, None),
        (70, 3, 16, 0.7),
        (200, 1, 64, 1.0),
        (45, 2, 8, None),
    ],
)
def test_forward_only_equals_the_oracle(T, B, chunk_size, scale):
    """Without gradients (inference, prefill) the chunked form takes its own route (inputs read in place, no chunk
    copies, states kept for one batched output product): output and final state against the float64 oracle, from
    an initial state and without one, lengths on and off the chunk grid."""
    taken = []
    for initial_state in (True, False):
        # decays up to e^-3 per token in chunks of at most 16, RWKV-7's (spans below MAX_SPAN) in longer ones
        decay = "mixed" if chunk_size <= 16 else "rwkv7"
        inputs = make_inputs(T, B=B, initial_state=initial_state, decay=decay, seed=T)
        expected_out, expected_final = naive_op()(**inputs, scale=scale)
        with _route(taken):
            out, final = _forward_only(op("torch", chunk_size, scale=scale), inputs)
        assert rel_err(out, expected_out) < TOLERANCE[torch.float64]
        assert rel_err(final, expected_final) < TOLERANCE[torch.float64]
        f32 = {n: (x.float() if x is not None else None) for n, x in inputs.items()}
        out32, final32 = _forward_only(op("torch", chunk_size, scale=scale), f32)
        assert out32.dtype == torch.float32 and final32.dtype == torch.float32
        assert rel_err(out32, expected_out) < TOLERANCE[torch.float32]
        assert rel_err(final32, expected_final) < TOLERANCE[torch.float32]
    assert taken and all(taken)


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
def test_forward_only_packed_equals_the_oracle(initial_state):
    """The forward-only route over packed sequences (empty ones first, inside and last; exact chunks; several
    chunks) against the oracle sequence by sequence; an empty sequence passes its initial state on exactly."""
    inputs = make_inputs(sum(PACKED_LENGTHS), B=1, initial_state=False)
    if initial_state:
        inputs["initial_state"] = torch.randn(len(PACKED_LENGTHS), H, DK, DV, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()])
    expected_out, expected_final = naive_op()(**inputs)
    out, final = _forward_only(op("torch", 16), inputs)
    assert rel_err(out, expected_out) < TOLERANCE[torch.float64]
    assert rel_err(final, expected_final) < TOLERANCE[torch.float64]
    assert final.shape == (len(PACKED_LENGTHS), H, DK, DV)
    h0 = inputs["initial_state"] if initial_state else torch.zeros(len(PACKED_LENGTHS), H, DK, DV).double()
    assert torch.equal(final[0], h0[0]) and torch.equal(final[-1], h0[-1])


def test_forward_only_strong_decays_and_per_head_gates():
    """Chunks whose decay span exceeds MAX_SPAN leave the forward-only route for the levelled pair matrices (same
    results as the oracle, float32); a per-head decay [B, T, H] and no states in or out go through it too."""
    inputs = make_inputs(150, decay="strong", seed=2)
    expected_out, expected_final = naive_op()(**inputs)
    f32 = {n: x.float() for n, x in inputs.items()}
    taken = []
    with _route(taken):
        out, final = _forward_only(op("torch", 32), f32)
    assert taken == [False]
    assert rel_err(out, expected_out) < TOLERANCE[torch.float32]
    assert rel_err(final, expected_final) < TOLERANCE[torch.float32]
    inputs = make_inputs(40, initial_state=False)
    inputs["g"] = inputs["g"][..., 0]
    expected_out, _ = naive_op(output_final_state=False)(**inputs)
    with _route(taken):
        out, final = _forward_only(op("torch", 16, output_final_state=False), inputs)
    assert taken == [False, True]
    assert final is None and rel_err(out, expected_out) < TOLERANCE[torch.float64]


def test_forward_only_state_chaining_and_inference_mode():
    """Under torch.inference_mode: [0, 70) then [70, 150) from the first part's final state equals the oracle over
    the whole."""
    inputs = make_inputs(150, decay="mixed", seed=5)
    expected_out, expected_final = naive_op()(**inputs)
    first = {n: (x[:, :70] if n != "initial_state" else x) for n, x in inputs.items()}
    with torch.inference_mode():
        out1, state = op("torch", 16)(**first)
        second = {n: x[:, 70:] for n, x in inputs.items() if n != "initial_state"}
        out2, final = op("torch", 16)(**second, initial_state=state)
    assert rel_err(torch.cat([out1, out2], 1), expected_out) < TOLERANCE[torch.float64]
    assert rel_err(final, expected_final) < TOLERANCE[torch.float64]


def test_empty_sequence():
    """T = 0: an empty output, and the initial state passed on as the final one."""
    inputs = make_inputs(0)
    for backend in ("naive", "torch", "triton"):
        out, final = op(backend)(**inputs)
        assert out.shape == (2, 0, H, DV)
        torch.testing.assert_close(final, inputs["initial_state"])


def test_long_sequence_float32_stays_finite_and_accurate():
    """T = 4096 in float32 (chunks of 64) against the float64 oracle, forward and every gradient: strong decays
    (e^-30 per token on some channels for stretches, e^-3 elsewhere), keys 30x larger than unit, the rank-one part
    at full strength (iclr near 1). The harness's float32 tolerance holds (observed errors about 3e-7)."""
    T = 4096
    inputs = make_inputs(T, B=1, decay="strong", seed=3)
    inputs["g"][:, 1000:1600:7] = -30.0
    inputs["k"] = 30 * inputs["k"]
    kappa = -inputs["a"]
    inputs["b"] = kappa * (1 - 1e-3 * torch.rand(kappa.shape, dtype=torch.float64))
    errors = check_forward_backward(op("torch", 64), naive_op(), inputs, dtype=torch.float32)
    assert all(math.isfinite(e) for e in errors.values())
    out, final = op("torch", 64)(**{n: x.float() for n, x in inputs.items()})
    assert torch.isfinite(out).all() and torch.isfinite(final).all()


# ------------------------------------------------------------------------------------------- triton vs naive
# The Triton kernels run chunks of 16 tokens (chunk_size is the torch form's), under the interpreter on a CPU.

F32 = TOLERANCE[torch.float32]


@pytest.mark.parametrize(("T", "B", "decay"), [(1, 2, "rwkv7"), (37, 1, "rwkv7"), (40, 2, "strong")])
def test_triton_forward_backward(T, B, decay):
    """Output, final state and every gradient (q, k, v, a, b, g, initial state) in float32 against the float64
    oracle: one token, lengths that are not a multiple of 16, channels decaying by e^-30 per token."""
    inputs = make_inputs(T, B=B, decay=decay)
    check_forward_backward(op("triton"), naive_op(), inputs, dtype=torch.float32, what=f"T={T} {decay}")


def test_triton_several_key_and_value_tiles(monkeypatch):
    """Head sizes over one block (Dk = Dv = 20: two key tiles of the pair kernels, two value tiles of 16)."""
    from zoo.ops.delta_rule import triton as triton_impl

    config = triton_impl.launch_config
    monkeypatch.setattr(triton_impl, "launch_config", lambda K, V: config(K, V)._replace(BV=16))
    inputs = make_inputs(17, B=1, decay="mixed", dk=20, dv=20)
    check_forward_backward(op("triton"), naive_op(), inputs, dtype=torch.float32, what="Dk=Dv=20")


def test_triton_per_head_decay_without_states():
    """g [B, T, H] broadcast over the key channels; no initial state in, none out."""
    inputs = make_inputs(9, initial_state=False)
    inputs["g"] = inputs["g"][..., 0]
    no_state = op("triton", output_final_state=False)
    check_forward_backward(no_state, naive_op(output_final_state=False), inputs, dtype=torch.float32)


def test_triton_state_chaining():
    """[0, 11) then [11, 34) from the first part's final state equals the whole (neither split on a chunk)."""
    inputs = {n: x.float() for n, x in make_inputs(34, B=1, decay="mixed").items()}
    check_state_chaining(op("triton"), inputs, split=11, seq_dims=SEQ_DIMS, tol=F32)


def test_triton_varlen():
    """Three packed sequences (lengths 9, 1, 18) equal three separate calls, gradients included."""
    sequences = [make_inputs(T, B=1, decay="mixed", seed=i) for i, T in enumerate((9, 1, 18))]
    sequences = [{n: x.float() for n, x in seq.items()} for seq in sequences]
    check_varlen(op("triton"), sequences, seq_dims=SEQ_DIMS, tol=F32)


def test_triton_packed_equals_the_oracle():
    """One pass over packed sequences (empty ones first, inside and last; one of exactly one chunk) against the
    oracle run sequence by sequence; an empty sequence passes its initial state on exactly."""
    inputs = make_inputs(sum(PACKED_LENGTHS), B=1, initial_state=False)
    inputs["initial_state"] = torch.randn(len(PACKED_LENGTHS), H, DK, DV, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()])
    check_forward_backward(op("triton"), naive_op(), inputs, dtype=torch.float32)
    _, final = op("triton")(**inputs)
    assert torch.equal(final[0], inputs["initial_state"][0])


def test_triton_gated_deltanet():
    """delta_rule (Gated DeltaNet) on the Triton kernels against the paper's equations."""
    wrapper = functools.partial(delta_rule, backend="triton", output_final_state=True)
    inputs = deltanet_inputs(20, "head")
    check_forward_backward(wrapper, deltanet_equations, inputs, dtype=torch.float32, what="triton gated")


# ------------------------------------------------------------------------------------------- states, packing, steps


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_state_chaining(backend):
    """[0, 70) then [70, 150) from the first part's final state equals the whole."""
    inputs = make_inputs(150, decay="mixed")
    check_state_chaining(op(backend, 16), inputs, split=70, seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64])


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_varlen(backend):
    """Four packed sequences (lengths 17, 1, 64, 50; chunk 16) equal four separate calls, gradients included."""
    sequences = [make_inputs(T, B=1, decay="mixed", seed=i) for i, T in enumerate((17, 1, 64, 50))]
    check_varlen(op(backend, 16), sequences, seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64], what=backend)


# With chunk 16: empty sequences (also first and last), length 1, exact chunks, several chunks.
PACKED_LENGTHS = (0, 5, 1, 16, 0, 33, 2, 0)


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
def test_packed_equals_the_oracle(initial_state):
    """One pass over packed sequences (empty ones included) against the oracle run sequence by sequence."""
    inputs = make_inputs(sum(PACKED_LENGTHS), B=1, initial_state=False)
    if initial_state:
        inputs["initial_state"] = torch.randn(len(PACKED_LENGTHS), H, DK, DV, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(PACKED_LENGTHS).cumsum(0).tolist()])
    check_forward_backward(op("torch", 16), naive_op(), inputs)
    _, final = op("torch", 16)(**inputs)
    assert final.shape == (len(PACKED_LENGTHS), H, DK, DV)
    assert torch.equal(
        final[0], inputs["initial_state"][0] if initial_state else torch.zeros(H, DK, DV).double()
    )


@pytest.mark.parametrize("layout", ["BHD", "B1HD"])
def test_step_equals_forward(layout):
    """Decoding token by token with dplr_delta_rule_step equals the chunked forward, outputs and final state."""

    def step(token, state):
        if layout == "BHD":
            token = {n: x[:, 0] for n, x in token.items()}
        out, state = dplr_delta_rule_step(**token, state=state)
        return (out[:, None] if layout == "BHD" else out), state

    check_step(op("torch", 16), step, make_inputs(40), seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64])


def test_step_from_no_state_after_a_float32_prefill():
    """A model's decoding: a float32 prefill, then steps from its state; a first step without a state starts
    from zeros."""
    inputs = make_inputs(30, initial_state=False)
    full, _ = naive_op()(**inputs)
    f32 = {n: x.float() for n, x in inputs.items() if x is not None}
    prefix, state = op("torch", 16)(**{n: x[:, :20] for n, x in f32.items()})
    assert state.dtype == torch.float32
    outs = [prefix]
    for t in range(20, 30):
        out, state = dplr_delta_rule_step(**{n: x[:, t] for n, x in f32.items()}, state=state)
        outs.append(out[:, None])
    assert rel_err(torch.cat(outs, 1), full) < TOLERANCE[torch.float32]
    token = {n: x[:, 0] for n, x in inputs.items() if x is not None}
    y0, s0 = dplr_delta_rule_step(**token)
    y1, s1 = dplr_delta_rule_step(**token, state=torch.zeros(2, H, DK, DV, dtype=torch.float64))
    assert torch.equal(y0, y1) and torch.equal(s0, s1) and s0.dtype == torch.float64


# ------------------------------------------------------------------------------------------- DeltaNet wrappers


def deltanet_equations(q, k, v, beta, g=None, initial_state=None, scale=None, output_final_state=True):
    """DeltaNet (Yang et al. 2024, arXiv:2406.06484, eq. 2) and Gated DeltaNet (arXiv:2412.06464, eq. 10) as the
    papers write them, S (Dv x Dk):  S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,  o_t = S_t q_t
    (scaled), alpha_t = exp(g_t) per head, or per key channel as S_{t-1} diag(alpha_t) (I - beta_t k_t k_t^T)."""
    B, T, Hh, Dk = q.shape
    scale = Dk**-0.5 if scale is None else scale
    eye = torch.eye(Dk, dtype=q.dtype)
    S = q.new_zeros(B, Hh, v.shape[-1], Dk) if initial_state is None else initial_state.transpose(-1, -2)
    outs = []
    for t in range(T):
        kt = k[:, t]
        erase = eye - beta[:, t, :, None, None] * kt[..., :, None] * kt[..., None, :]  # (B, H, Dk, Dk)
        if g is None:
            decayed = S
        elif g.dim() == 3:
            decayed = g[:, t].exp()[..., None, None] * S
        else:
            decayed = S * g[:, t].exp()[..., None, :]  # S diag(alpha)
        S = decayed @ erase + beta[:, t, :, None, None] * v[:, t, :, :, None] * kt[..., None, :]
        outs.append(scale * (S @ q[:, t, ..., None])[..., 0])
    return torch.stack(outs, 1), S.transpose(-1, -2)


def deltanet_inputs(T: int, gate: str | None, B: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": F.normalize(randn(B, T, H, DK), dim=-1),
        "k": F.normalize(randn(B, T, H, DK), dim=-1),
        "v": randn(B, T, H, DV),
        "beta": torch.sigmoid(randn(B, T, H)),
        "initial_state": randn(B, H, DK, DV),
    }
    if gate == "head":
        inputs["g"] = F.logsigmoid(2 * randn(B, T, H) + 3)
    elif gate == "channel":
        inputs["g"] = F.logsigmoid(2 * randn(B, T, H, DK) + 3)
    return inputs


@pytest.mark.parametrize("gate", [None, "head", "channel"], ids=["deltanet", "gated", "gated_per_channel"])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_delta_rule_equals_the_papers_equations(backend, gate):
    """delta_rule (forward, final state, gradients of q, k, v, beta, g, initial state) against DeltaNet / Gated
    DeltaNet written out above."""
    wrapper = functools.partial(delta_rule, backend=backend, chunk_size=16, output_final_state=True)
    check_forward_backward(wrapper, deltanet_equations, deltanet_inputs(50, gate), what=f"{backend} {gate}")


def test_delta_rule_step_and_packing():
    """delta_rule_step decodes as the full forward; packed sequences equal separate calls."""
    inputs = deltanet_inputs(20, "head")
    dims = {"q": 1, "k": 1, "v": 1, "beta": 1, "g": 1}

    def step(token, state):
        return delta_rule_step(**token, state=state)

    wrapper = functools.partial(delta_rule, backend="torch", chunk_size=8, output_final_state=True)
    check_step(wrapper, step, inputs, seq_dims=dims, tol=TOLERANCE[torch.float64])
    sequences = [deltanet_inputs(T, "head", B=1, seed=i) for i, T in enumerate((9, 16, 3))]
    check_varlen(wrapper, sequences, seq_dims=dims, tol=TOLERANCE[torch.float64])


# ------------------------------------------------------------------------------------------- dispatch, errors


def test_backends_route_to_their_forms(monkeypatch):
    """backend= and ZOO_BACKEND pick the form: naive, the chunked torch form, the Triton kernels."""
    from zoo.ops import delta_rule as package
    from zoo.ops.delta_rule import triton as triton_impl

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    calls = []
    for module, attr in (
        (package.naive, "naive_dplr_delta_rule"),
        (package.chunk, "chunk_dplr_delta_rule"),
        (triton_impl, "triton_dplr_delta_rule"),
    ):
        original = getattr(module, attr)

        def spy(*args, _attr=attr, _original=original, **kwargs):
            calls.append(_attr.split("_")[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)
    inputs = make_inputs(5)
    dplr_delta_rule(**inputs, backend="naive")
    monkeypatch.setenv("ZOO_BACKEND", "torch")
    dplr_delta_rule(**inputs)
    dplr_delta_rule(**inputs, backend="triton")
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    dplr_delta_rule(**inputs)
    assert calls == ["naive", "chunk", "triton", "triton"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": torch.zeros(2, 6, H)}, r"q has shape \(2, 6, 2\), expected \[B, T, H, Dk\]"),
        ({"k": torch.zeros(2, 6, H, DK + 1, dtype=torch.float64)}, "k has shape"),
        ({"a": torch.zeros(2, 6, H, DK + 1, dtype=torch.float64)}, "a has shape"),
        ({"b": torch.zeros(2, 5, H, DK, dtype=torch.float64)}, "b has shape"),
        ({"v": torch.zeros(2, 6, H + 1, DV, dtype=torch.float64)}, r"v has shape .*\[B, T, H, Dv\]"),
        ({"g": torch.zeros(2, 6, H, DK - 1, dtype=torch.float64)}, r"g has shape .*per key channel"),
        ({"g": torch.zeros(2, 6, H, DK, dtype=torch.int64)}, "g has dtype"),
        (
            {"a": torch.zeros(2, 6, H, DK, dtype=torch.float32)},
            "a has dtype torch.float32, expected the dtype",
        ),
        ({"initial_state": torch.zeros(2, H, DV, DK, dtype=torch.float64)}, r"initial_state has shape"),
        ({"cu_seqlens": torch.tensor([0, 3, 6])}, "B == 1"),
        ({"chunk_size": 48}, "chunk_size=48, expected a power of 2"),
        ({"backend": "cuda"}, "backend='cuda'"),
    ],
)
def test_invalid_arguments(change, message):
    inputs = {**make_inputs(6), **change}
    with pytest.raises(ValueError, match=message):
        dplr_delta_rule(**{"backend": "torch", **inputs})


def test_invalid_packing_steps_and_wrappers():
    inputs = make_inputs(6, B=1, initial_state=False)
    with pytest.raises(
        ValueError, match=r"cu_seqlens=\[0, 2, 5\], expected non-decreasing offsets from 0 to T=6"
    ):
        dplr_delta_rule(**inputs, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(
        ValueError, match=r"initial_state has shape \(1, 2, 6, 5\), expected \[N, H, Dk, Dv\]=\[2"
    ):
        dplr_delta_rule(
            **{**inputs, "initial_state": torch.zeros(1, H, DK, DV)}, cu_seqlens=torch.tensor([0, 2, 6])
        )
    token = {n: x[:, 0] for n, x in inputs.items() if x is not None}
    with pytest.raises(ValueError, match="state has shape"):
        dplr_delta_rule_step(**token, state=torch.zeros(1, H, DK, DV + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"q has shape .*one token"):
        dplr_delta_rule_step(**{**token, "q": inputs["q"]})
    dn = deltanet_inputs(6, None)
    with pytest.raises(ValueError, match=r"delta_rule: beta has shape \(2, 6\)"):
        delta_rule(**{**dn, "beta": dn["beta"][..., 0]})
    with pytest.raises(ValueError, match=r"delta_rule: g has shape"):
        delta_rule(**dn, g=torch.zeros(2, 6, H, DK + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"delta_rule: v has shape"):
        delta_rule(**{**dn, "v": dn["v"][:, :3]})
