"""Infini-attention's compressive memory (zoo.ops.compressive_memory): the torch form and the Triton kernels against
the naive loop over segments, via harness.py, and the naive loop against the dense form of the linear rule written
out here.

torch runs in float64 against the float64 oracle (harness tolerance 1e-11, elementwise max |a - b| / max |b|) and in
float32 (harness tolerance 5e-5); triton in float32 (5e-5; under TRITON_INTERPRET=1 on a CPU, so at small sizes).
Lengths that are and are not multiples of the segment, segments shorter and longer than the kernels' blocks of
tokens, both update rules, with and without an initial state (z > 0 wherever M is nonzero, as any state the op
returns).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from zoo.ops import dispatch
from zoo.ops.compressive_memory import (
    compressive_memory,
    compressive_memory_read,
    compressive_memory_step,
    compressive_memory_write,
)

from .harness import (
    TOLERANCE,
    check_forward_backward,
    check_state_chaining,
    check_step,
    check_varlen,
    rel_err,
)

H, DK, DV = 2, 5, 3  # odd sizes on purpose
SEQ_DIMS = {"q": 1, "k": 1, "v": 1}
RULES = ["linear", "delta"]


def make_inputs(
    T: int, *, B: int = 2, initial_state: bool = True, seed: int = 0, dk: int = DK, dv: int = DV
) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    h0 = None
    if initial_state:  # a memory that has seen a few tokens: z of order one per token, M alike
        h0 = torch.cat(
            [randn(B, H, dk, dv), 3 + torch.rand(B, H, dk, 1, generator=gen, dtype=torch.float64)], -1
        )
    return {"q": randn(B, T, H, dk), "k": randn(B, T, H, dk), "v": randn(B, T, H, dv), "initial_state": h0}


def op(backend: str, segment_length: int, update: str, output_final_state: bool = True):
    return functools.partial(
        compressive_memory,
        segment_length=segment_length,
        update=update,
        backend=backend,
        output_final_state=output_final_state,
    )


@pytest.mark.parametrize("update", RULES)
@pytest.mark.parametrize("T,L", [(1, 4), (7, 4), (16, 4), (37, 8), (20, 1), (9, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward(T, L, update, dtype):
    check_forward_backward(
        op("torch", L, update),
        op("naive", L, update),
        make_inputs(T),
        dtype=dtype,
        what=f"{update} T={T} L={L}",
    )


@pytest.mark.parametrize("update", RULES)
def test_without_states(update):
    inputs = make_inputs(19, initial_state=False)
    inputs.pop("initial_state")
    out, final = compressive_memory(**inputs, segment_length=4, update=update)
    assert final is None and out.shape == (2, 19, H, DV)
    check_forward_backward(
        op("torch", 4, update, output_final_state=False),
        op("naive", 4, update, output_final_state=False),
        inputs,
    )


@pytest.mark.parametrize("update", RULES)
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_state_chaining(backend, update):
    """Two calls split at a segment boundary (the second from the first's final state) equal one call."""
    check_state_chaining(
        op(backend, 8, update), make_inputs(37), split=16, seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64]
    )


@pytest.mark.parametrize("update", RULES)
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_varlen(backend, update):
    """Packed sequences (lengths 9, 1, 16, 6; segments of 4 restarting at each) equal separate calls."""
    sequences = [make_inputs(T, B=1, seed=i) for i, T in enumerate([9, 1, 16, 6])]
    check_varlen(op(backend, 4, update), sequences, seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64])


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_empty_packed_sequence_keeps_its_initial_state(backend):
    inputs = make_inputs(7, B=1)
    h0 = torch.cat([inputs["initial_state"], 2 * inputs["initial_state"]])
    cu = torch.tensor([0, 7, 7])
    out, state = compressive_memory(**{**inputs, "initial_state": h0}, segment_length=4, cu_seqlens=cu,
                                    backend=backend, output_final_state=True)  # fmt: skip
    alone, alone_state = compressive_memory(
        **inputs, segment_length=4, backend="naive", output_final_state=True
    )
    assert rel_err(out, alone) < 1e-12 and rel_err(state[:1], alone_state) < 1e-12
    torch.testing.assert_close(state[1], h0[1], rtol=0, atol=0)


@pytest.mark.parametrize("update", RULES)
def test_token_steps_equal_segments_of_one(update):
    """With segments of one token, stepping token by token is the op."""

    def step(token, state):
        return compressive_memory_step(token["q"], token["k"], token["v"], state, update=update)

    check_step(op("torch", 1, update), step, make_inputs(12), seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64])


@pytest.mark.parametrize("initial_state", [True, False])
@pytest.mark.parametrize("update", RULES)
def test_segment_steps_equal_the_op(update, initial_state):
    """Streaming one segment at a time (the last one short), and reading an unfinished segment, equal one call."""
    inputs = make_inputs(23, initial_state=initial_state)
    q, k, v, state = inputs["q"], inputs["k"], inputs["v"], inputs["initial_state"]
    full, full_state = compressive_memory(**inputs, segment_length=8, update=update, output_final_state=True)
    outs = []
    for start in range(0, 23, 8):
        seg = slice(start, start + 8)
        if state is not None:  # reading alone gives the same as the step's read
            read = compressive_memory_read(q[:, seg], state)
            torch.testing.assert_close(read, compressive_memory_step(q[:, seg], k[:, seg], v[:, seg], state,
                                                                     update=update)[0], rtol=0, atol=0)  # fmt: skip
        out, state = compressive_memory_step(q[:, seg], k[:, seg], v[:, seg], state, update=update)
        outs.append(out)
    errors = {"out": rel_err(torch.cat(outs, 1), full), "state": rel_err(state, full_state)}
    assert max(errors.values()) < TOLERANCE[torch.float64], errors


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_linear_rule_equals_the_dense_block_form(backend):
    """The linear rule written as one dense matrix: token i reads every token j of an earlier segment,
    A_mem = (σ(Q) σ(K)^T ⊙ [seg(j) < seg(i)]) [V | 1] + σ(Q) [M0 | z0], numerator over the last column."""
    T, L = 26, 6
    inputs = make_inputs(T)
    q, k, v, h0 = inputs["q"], inputs["k"], inputs["v"], inputs["initial_state"]
    sq, sk = F.elu(q) + 1, F.elu(k) + 1
    seg = torch.arange(T) // L
    earlier = (seg[None, :] < seg[:, None]).double()  # (i, j)
    vz = torch.cat([v, torch.ones(*v.shape[:3], 1, dtype=v.dtype)], -1)
    scores = torch.einsum("bihk,bjhk->bhij", sq, sk) * earlier
    read = torch.einsum("bhij,bjhv->bihv", scores, vz) + torch.einsum("bihk,bhkv->bihv", sq, h0)
    expected = read[..., :DV] / (read[..., DV:] + 1e-6)
    out, _ = compressive_memory(**inputs, segment_length=L, update="linear", backend=backend)
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("update", RULES)
def test_empty_memory_reads_exactly_zero(update):
    """Without an initial state the first segment reads exactly zero (M = z = 0: the eps-guarded 0 / 0), and the
    delta rule's first write equals the linear rule's (its retrieval from the empty memory is zero too)."""
    inputs = make_inputs(10, initial_state=False)
    out, state = compressive_memory(**inputs, segment_length=4, update=update, output_final_state=True)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert out[:, 4:].abs().min() > 0
    first = {
        u: compressive_memory_write(inputs["k"][:, :4], inputs["v"][:, :4], None, update=u) for u in RULES
    }
    torch.testing.assert_close(first["delta"], first["linear"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- triton vs naive
# The Triton kernels cut every segment into blocks of 16 tokens; they run under the interpreter on a CPU.

F32 = TOLERANCE[torch.float32]


@pytest.mark.parametrize("update", RULES)
@pytest.mark.parametrize("T,L", [(1, 4), (7, 4), (6, 1), (45, 20), (37, 40)])
def test_triton_forward_backward(T, L, update):
    """Output, final state and every gradient (q, k, v, initial state) in float32 against the float64 oracle: one
    token, a short last segment, segments of one token, of 20 (a block and a part) and of 40 (three blocks)."""
    check_forward_backward(
        op("triton", L, update),
        op("naive", L, update),
        make_inputs(T),
        dtype=torch.float32,
        what=f"T={T} L={L}",
    )


@pytest.mark.parametrize("update", RULES)
def test_triton_without_states(update):
    """No initial state in (the first segment reads the empty memory: exactly zero), none out."""
    inputs = make_inputs(11, initial_state=False)
    inputs.pop("initial_state")
    out, _ = compressive_memory(**{n: x.float() for n, x in inputs.items()}, segment_length=4, update=update,
                                backend="triton")  # fmt: skip
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    check_forward_backward(
        op("triton", 4, update, output_final_state=False),
        op("naive", 4, update, output_final_state=False),
        inputs,
        dtype=torch.float32,
    )


@pytest.mark.parametrize("update", RULES)
def test_triton_several_value_tiles(monkeypatch, update):
    """Head sizes that are not powers of 2 (Dk = 20 in a block of 32 keys, Dv = 20 in two value tiles of 16)."""
    from zoo.ops.compressive_memory import triton as triton_impl

    config = triton_impl.launch_config
    monkeypatch.setattr(triton_impl, "launch_config", lambda *sizes: config(*sizes)._replace(BV=16))
    inputs = make_inputs(13, B=1, dk=20, dv=20)
    check_forward_backward(op("triton", 5, update), op("naive", 5, update), inputs, dtype=torch.float32)


@pytest.mark.parametrize("update", RULES)
def test_triton_state_chaining(update):
    """[0, 16) then [16, 37) from the first part's final state equals the whole (segments of 8)."""
    inputs = {n: x.float() for n, x in make_inputs(37).items()}
    check_state_chaining(op("triton", 8, update), inputs, split=16, seq_dims=SEQ_DIMS, tol=F32)


@pytest.mark.parametrize("update", RULES)
def test_triton_varlen(update):
    """Packed sequences (lengths 9, 1, 6; segments of 4 restarting at each) equal separate calls."""
    sequences = [make_inputs(T, B=1, seed=i) for i, T in enumerate([9, 1, 6])]
    sequences = [{n: x.float() for n, x in seq.items()} for seq in sequences]
    check_varlen(op("triton", 4, update), sequences, seq_dims=SEQ_DIMS, tol=F32)


@pytest.mark.parametrize("update", RULES)
def test_triton_packed_equals_the_oracle(update):
    """One pass over packed sequences, empty ones first, inside and last, against the oracle run sequence by
    sequence; an empty sequence passes its initial state on exactly."""
    lengths = [0, 11, 0, 3, 0]
    inputs = make_inputs(sum(lengths), B=len(lengths))
    inputs.update({n: inputs[n][:1] for n in ("q", "k", "v")})
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    check_forward_backward(op("triton", 4, update), op("naive", 4, update), inputs, dtype=torch.float32)
    _, final = op("triton", 4, update)(**inputs)
    for n in (0, 2, 4):
        assert torch.equal(final[n], inputs["initial_state"][n])


@pytest.mark.parametrize("update", RULES)
def test_triton_low_precision_inputs(update):
    """bfloat16 in, bfloat16 out, float32 state; close to the float32 result at bfloat16's resolution."""
    inputs = make_inputs(21)
    bf16 = {n: x.bfloat16() if n != "initial_state" else x.float() for n, x in inputs.items()}
    out, state = op("triton", 8, update)(**bf16)
    ref, ref_state = op("naive", 8, update)(**{n: x.float() for n, x in bf16.items()})
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(out, ref) < 2e-2 and rel_err(state, ref_state) < 2e-2


def test_backends_route_to_their_forms(monkeypatch):
    """backend= and ZOO_BACKEND pick the form: the naive loop, the batched torch form, the Triton kernels."""
    from zoo.ops import compressive_memory as package
    from zoo.ops.compressive_memory import triton as triton_impl

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    calls = []
    for module, attr in (
        (package.naive, "naive_compressive_memory"),
        (package.chunk, "chunk_compressive_memory"),
        (triton_impl, "triton_compressive_memory"),
    ):
        original = getattr(module, attr)

        def spy(*args, _attr=attr, _original=original, **kwargs):
            calls.append(_attr.split("_")[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)
    inputs = make_inputs(5)
    compressive_memory(**inputs, segment_length=4, backend="naive")
    monkeypatch.setenv("ZOO_BACKEND", "torch")
    compressive_memory(**inputs, segment_length=4)
    compressive_memory(**inputs, segment_length=4, backend="triton")
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    compressive_memory(**inputs, segment_length=4)
    assert calls == ["naive", "chunk", "triton", "triton"]


def test_bad_inputs_are_value_errors():
    inputs = make_inputs(8)
    with pytest.raises(ValueError, match="update='hebbian'"):
        compressive_memory(**inputs, segment_length=4, update="hebbian")
    with pytest.raises(ValueError, match="segment_length=0"):
        compressive_memory(**inputs, segment_length=0)
    with pytest.raises(ValueError, match="initial_state has shape"):
        compressive_memory(**{**inputs, "initial_state": inputs["initial_state"][..., :DV]}, segment_length=4)
    with pytest.raises(ValueError, match="B == 1 when cu_seqlens"):
        compressive_memory(**inputs, segment_length=4, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="eps"):
        compressive_memory(**inputs, segment_length=4, eps=0.0)
    with pytest.raises(ValueError, match="k has shape"):
        compressive_memory(inputs["q"], inputs["k"][:, :3], inputs["v"], segment_length=4)
