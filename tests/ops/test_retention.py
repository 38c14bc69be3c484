"""Retention (zoo.ops.retention): the torch and triton backends against the naive oracle, via harness.py.

torch runs in float64 (tolerance 1e-11, elementwise max |a - b| / max |b|, observed up to ~4e-14); triton runs in
float32 under the CPU interpreter (tolerance 5e-5, observed up to ~7e-6). Both decay kinds: a fixed per-head log gamma [H] (RetNet) and per-token log-gates [B, T, H] (gated).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.ops.retention import retention, retention_step
from zoo.ops.retention.naive import naive_parallel_retention, naive_recurrent_retention

from .harness import (
    TOLERANCE,
    check_forward_backward,
    check_state_chaining,
    check_step,
    check_varlen,
    rel_err,
)

# Odd head dims on purpose: the Triton kernels pad them to power-of-2 blocks and must mask.
H, DK, DV = 2, 12, 10
BACKEND_DTYPE = {"naive": torch.float64, "torch": torch.float64, "triton": torch.float32}
DECAYS = ["fixed", "gated"]


def make_inputs(
    T: int, decay_kind: str, *, B: int = 2, initial_state: bool = True, gate_scale: float = 1.0
) -> dict[str, torch.Tensor | None]:
    """float64 inputs for ``retention``; the harness casts them per backend."""
    q = torch.randn(B, T, H, DK, dtype=torch.float64)
    k = torch.randn(B, T, H, DK, dtype=torch.float64)
    v = torch.randn(B, T, H, DV, dtype=torch.float64)
    if decay_kind == "fixed":
        # RetNet's per-head gammas, 1 - 2^(-5 - h)
        decay = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))  # (H,)
    else:
        # mostly mild forgetting with some near-resets, as a learned sigmoid gate would produce
        decay = gate_scale * F.logsigmoid(2 * torch.randn(B, T, H, dtype=torch.float64) + 2)  # (B, T, H)
    h0 = torch.randn(B, H, DK, DV, dtype=torch.float64) if initial_state else None
    return {"q": q, "k": k, "v": v, "decay": decay, "initial_state": h0}


def seq_dims(decay_kind: str) -> dict[str, int]:
    return {"q": 1, "k": 1, "v": 1, **({"decay": 1} if decay_kind == "gated" else {})}


def op(backend: str, chunk_size: int | None = 64, output_final_state: bool = True):
    return functools.partial(
        retention, backend=backend, chunk_size=chunk_size, output_final_state=output_final_state
    )


def naive_op(output_final_state: bool = True):
    return op("naive", output_final_state=output_final_state)


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("T", [1, 63, 200])
def test_naive_parallel_equals_recurrent(T, decay_kind):
    inputs = make_inputs(T, decay_kind)

    def parallel(q, k, v, decay, initial_state):
        g = decay.expand(q.shape[:3]) if decay.dim() == 1 else decay
        return naive_parallel_retention(q, k, v, g, DK**-0.5, initial_state, True)

    def recurrent(q, k, v, decay, initial_state):
        g = decay.expand(q.shape[:3]) if decay.dim() == 1 else decay
        return naive_recurrent_retention(q, k, v, g, DK**-0.5, initial_state, True)

    check_forward_backward(parallel, recurrent, inputs, what=f"parallel T={T}")


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 63, 64, 200])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_backward(backend, T, chunk_size, decay_kind):
    inputs = make_inputs(T, decay_kind)
    check_forward_backward(
        op(backend, chunk_size), naive_op(), inputs, dtype=BACKEND_DTYPE[backend], what=f"{backend} T={T}"
    )


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_with_kept_or_recomputed_states(monkeypatch, backend, decay_kind, keep):
    """The backward gives the same gradients whether it reuses the forward's chunk states or recomputes them
    (what ``keep_chunk_states`` decides from the head sizes), with an initial state and final-state gradient."""
    import importlib

    module = importlib.import_module(f"zoo.ops.retention.{'chunk' if backend == 'torch' else 'triton'}")
    monkeypatch.setattr(module, "keep_chunk_states", lambda *sizes: keep)
    inputs = make_inputs(150 if backend == "torch" else 70, decay_kind)
    check_forward_backward(
        op(backend, 16), naive_op(), inputs, dtype=BACKEND_DTYPE[backend], what=f"{backend} keep={keep}"
    )


def test_chunk_states_are_kept_only_while_no_larger_than_qkv():
    from zoo.ops.retention.chunk import keep_chunk_states

    assert keep_chunk_states(64, 128, 64)  # 8192 numbers per chunk and head against 64 * 256
    assert not keep_chunk_states(256, 512, 64)  # 131072 against 64 * 1024
    assert keep_chunk_states(256, 512, 128)  # exactly equal: kept


def test_default_chunk_size_follows_the_head_sizes(monkeypatch):
    """No chunk_size: the torch path picks the power of 2 at or below sqrt(Dk Dv) in [16, 128] (short chunks for
    small heads), the Triton kernels 64; what the op runs with is what the chunked form receives, and the result
    equals the oracle's."""
    from zoo.ops.retention import chunk, default_chunk_size

    assert [default_chunk_size("torch", dk, dv) for dk, dv in [(8, 8), (16, 16), (16, 64), (64, 64), (128, 64)]] == [
        16, 16, 32, 64, 64
    ]  # fmt: skip
    assert default_chunk_size("torch", 256, 256) == 128 and default_chunk_size("triton", 16, 16) == 64
    seen = []
    real = chunk.chunk_retention

    def spy(*args, chunk_size, **kwargs):
        seen.append(chunk_size)
        return real(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(chunk, "chunk_retention", spy)
    inputs = make_inputs(70, "gated", B=1)
    check_forward_backward(op("torch", None), naive_op(), inputs, dtype=torch.float64)
    assert set(seen) == {default_chunk_size("torch", DK, DV)} == {16}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunk_size_not_dividing(backend):
    """T = 100 in chunks of 32 for triton, and of 37 (not a power of 2) for torch."""
    chunk_size = 37 if backend == "torch" else 32
    inputs = make_inputs(100, "gated", B=1)
    check_forward_backward(op(backend, chunk_size), naive_op(), inputs, dtype=BACKEND_DTYPE[backend])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_states(backend):
    """No initial state in, no final state out: the op returns None and the gradients still match."""
    inputs = make_inputs(70, "gated", initial_state=False)
    inputs.pop("initial_state")
    out, final_state = retention(**inputs, backend=backend)
    assert final_state is None and out.shape == (2, 70, H, DV)
    check_forward_backward(
        op(backend, 16, output_final_state=False),
        naive_op(output_final_state=False),
        inputs,
        dtype=BACKEND_DTYPE[backend],
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strongly_decaying_gates_stay_finite(backend):
    """Log-gates down to -60 per token: decays far below float range must not become nan or inf."""
    inputs = make_inputs(80, "gated", gate_scale=30.0)
    inputs["decay"][:, ::7] = -60.0
    # In float32 the cumulative log-gates of a chunk (down to about -1000) are rounded to ~1e-4, and exp(b_i - b_j)
    # inherits that as relative error (observed 4e-5, the torch backend in float32 alike).
    dtype = BACKEND_DTYPE[backend]
    tol = 2e-4 if dtype == torch.float32 else None
    errors = check_forward_backward(op(backend, 64), naive_op(), inputs, dtype=dtype, tol=tol)
    assert all(math.isfinite(e) for e in errors.values())


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_state_chaining(backend, decay_kind):
    dtype = BACKEND_DTYPE[backend]
    inputs = {n: x.to(dtype) for n, x in make_inputs(200, decay_kind).items()}
    check_state_chaining(
        op(backend, 16), inputs, split=70, seq_dims=seq_dims(decay_kind), tol=TOLERANCE[dtype], what=backend
    )


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_varlen(backend, decay_kind):
    """Four packed sequences (lengths 17, 1, 64, 50; chunk 16) equal four separate calls."""
    dtype = BACKEND_DTYPE[backend]
    shared = make_inputs(1, decay_kind, B=1)["decay"]
    sequences = []
    for T in (17, 1, 64, 50):
        seq = {n: x.to(dtype) for n, x in make_inputs(T, decay_kind, B=1).items()}
        if decay_kind == "fixed":
            seq["decay"] = shared.to(dtype)
        sequences.append(seq)
    check_varlen(
        op(backend, 16), sequences, seq_dims=seq_dims(decay_kind), tol=TOLERANCE[dtype], what=backend
    )


@pytest.mark.parametrize("layout", ["BHD", "B1HD"])
@pytest.mark.parametrize("decay_kind", DECAYS)
def test_step_equals_forward(decay_kind, layout):
    inputs = make_inputs(40, decay_kind)

    def step(token, state):
        q, k, v, decay = token["q"], token["k"], token["v"], token["decay"]
        if layout == "BHD":
            q, k, v = q[:, 0], k[:, 0], v[:, 0]
            decay = decay[:, 0] if decay.dim() == 3 else decay
        out, state = retention_step(q, k, v, decay, state)
        return (out[:, None] if layout == "BHD" else out), state

    check_step(op("torch", 16), step, inputs, seq_dims=seq_dims(decay_kind), tol=TOLERANCE[torch.float64])


def test_step_continues_a_prefix():
    """A model's decoding: prefill with the triton kernels, then step; equals the oracle on the whole."""
    inputs = make_inputs(30, "gated")
    full, _ = retention(**inputs, backend="naive")
    f32 = {n: x.float() for n, x in inputs.items()}
    prefill = {**{n: f32[n][:, :20] for n in ("q", "k", "v", "decay")}, "initial_state": f32["initial_state"]}
    prefix, state = retention(**prefill, output_final_state=True, backend="triton", chunk_size=16)
    assert state.dtype == torch.float32
    outs = [prefix]
    for t in range(20, 30):
        o, state = retention_step(f32["q"][:, t], f32["k"][:, t], f32["v"][:, t], f32["decay"][:, t], state)
        outs.append(o[:, None])
    got = torch.cat(outs, dim=1)
    assert rel_err(got, full) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_inputs(backend):
    """bfloat16 in, bfloat16 out, float32 state; close to the float32 result at bfloat16's resolution."""
    inputs = make_inputs(33, "gated")
    bf16 = {n: x.bfloat16() if n != "initial_state" else x.float() for n, x in inputs.items()}
    out, state = retention(**bf16, output_final_state=True, backend=backend, chunk_size=16)
    ref, ref_state = retention(
        **{n: x.float() for n, x in bf16.items()}, output_final_state=True, backend="naive"
    )
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(out, ref) < 2e-2 and rel_err(state, ref_state) < 2e-2


# ------------------------------------------------------------------------------------------- triton tiles


def tiled_inputs(lengths: tuple[int, ...], Dk: int, Dv: int, *, row_sum: bool) -> dict:
    """Packed sequences (B = 1) with heads of Dk / Dv channels, per-token gates, and one initial state per
    sequence (with the key-sum column for ``row_sum``)."""
    T, N = sum(lengths), len(lengths)
    return {
        "q": torch.randn(1, T, H, Dk, dtype=torch.float64),
        "k": torch.randn(1, T, H, Dk, dtype=torch.float64),
        "v": torch.randn(1, T, H, Dv, dtype=torch.float64),
        "decay": F.logsigmoid(2 * torch.randn(1, T, H, dtype=torch.float64) + 2),
        "initial_state": torch.randn(N, H, Dk, Dv + int(row_sum), dtype=torch.float64),
        "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]),
    }


def tiled_row_sum_reference(q, k, v, decay, initial_state, cu_seqlens):
    """The oracle on v with a channel of ones appended (any Dv): its last output channel is the row sum, its last
    state column the key sum, both detached as the op returns them."""
    Dv = v.shape[-1]
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype)
    out, state = retention(
        q, k, torch.cat([v, ones], -1), decay, initial_state=initial_state, output_final_state=True,
        cu_seqlens=cu_seqlens, backend="naive",
    )  # fmt: skip
    return out[..., :Dv], torch.cat([state[..., :Dv], state[..., Dv:].detach()], -1), out[..., Dv].detach()


@pytest.mark.parametrize(
    ("Dk", "Dv", "chunk_size"),
    [(64, 96, 64), (64, 96, 16), (40, 40, 32)],
    ids=["2x3-tiles", "masked-value-tile", "masked-tiles"],
)
def test_triton_tiled_heads(Dk, Dv, chunk_size):
    """Heads split across programs as ``launch_config`` picks: Dk 64 in two key tiles and Dv 96 in three value
    tiles of 32; at chunk 16 Dv 96 in a full and a half-masked tile of 64; Dk = Dv = 40 in a full and a masked
    tile each.
    Packed sequences of lengths not a multiple of the chunk, initial states, row sums and every gradient."""
    import triton

    from zoo.ops.retention.triton import launch_config

    cfg = launch_config(Dk, Dv, chunk_size)
    assert triton.cdiv(Dk, cfg.BK) > 1 and triton.cdiv(Dv, cfg.BV) > 1, f"not tiled: {cfg}"
    inputs = tiled_inputs((70, 1, 33), Dk, Dv, row_sum=True)
    fn = functools.partial(op("triton", chunk_size), output_row_sum=True)
    check_forward_backward(
        fn, tiled_row_sum_reference, inputs, dtype=torch.float32, what=f"triton Dk={Dk} Dv={Dv} {cfg}"
    )


@pytest.mark.parametrize("keep", [True, False])
def test_triton_small_tiles(monkeypatch, keep):
    """Tiles of 16 channels (Dk 40 in three key tiles, Dv 24 in two, the last ones masked) with a fixed decay over
    a regular batch, the chunk states kept or recomputed in the backward (from the initial states)."""
    from zoo.ops.retention import triton as kernels

    tiles_of_16 = kernels.LaunchConfig(BT=16, BK=16, BV=16, num_warps=4, num_stages=2)
    monkeypatch.setattr(kernels, "launch_config", lambda *sizes: tiles_of_16)
    monkeypatch.setattr(kernels, "keep_chunk_states", lambda *sizes: keep)
    inputs = {
        "q": torch.randn(2, 45, H, 40, dtype=torch.float64),
        "k": torch.randn(2, 45, H, 40, dtype=torch.float64),
        "v": torch.randn(2, 45, H, 24, dtype=torch.float64),
        "decay": torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))),
        "initial_state": torch.randn(2, H, 40, 24, dtype=torch.float64),
    }
    check_forward_backward(op("triton", 16), naive_op(), inputs, dtype=torch.float32, what=f"keep={keep}")


def test_triton_packed_empty_documents():
    """Empty documents (repeated cu_seqlens) own no chunk: their initial state is their final state, and its
    gradient the final state's."""
    inputs = tiled_inputs((0, 7, 0, 20, 1, 0), DK, DV, row_sum=False)
    check_forward_backward(op("triton", 16), naive_op(), inputs, dtype=torch.float32, what="empty documents")


def test_default_scale_and_explicit_scale():
    inputs = make_inputs(9, "fixed")
    out_default, _ = retention(**inputs, backend="naive")
    out_explicit, _ = retention(**inputs, scale=DK**-0.5, backend="naive")
    out_double, _ = retention(**inputs, scale=2 * DK**-0.5, backend="torch")
    torch.testing.assert_close(out_default, out_explicit)
    torch.testing.assert_close(out_double, 2 * out_default)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": torch.zeros(2, 5, H, dtype=torch.float64)}, "q has shape"),
        ({"k": torch.zeros(2, 6, H, DK + 1, dtype=torch.float64)}, "k has shape"),
        ({"v": torch.zeros(2, 6, H + 1, DV, dtype=torch.float64)}, "v has shape"),
        ({"v": torch.zeros(2, 6, H, DV)}, "v has dtype"),
        ({"decay": torch.zeros(H + 1, dtype=torch.float64)}, "decay has shape"),
        ({"decay": torch.zeros(2, 6, dtype=torch.float64)}, "decay has shape"),
        ({"decay": torch.zeros(H, dtype=torch.int64)}, "decay has dtype"),
        ({"initial_state": torch.zeros(2, H, DV, DK, dtype=torch.float64)}, "initial_state has shape"),
        ({"cu_seqlens": torch.tensor([0, 3, 6])}, "B == 1"),
        ({"q": torch.zeros(2, 6, H, DK, dtype=torch.int64)}, "q has dtype"),
    ],
)
def test_invalid_arguments(change, message):
    inputs = {**make_inputs(6, "fixed"), **change}
    with pytest.raises(ValueError, match=message):
        retention(**inputs, backend="torch")


def test_invalid_varlen_and_chunk_size():
    inputs = make_inputs(6, "fixed", B=1, initial_state=False)
    with pytest.raises(ValueError, match="cu_seqlens runs from 0 to 5"):
        retention(**inputs, cu_seqlens=torch.tensor([0, 2, 5]), backend="torch")
    with pytest.raises(
        ValueError, match=r"initial_state has shape \(1, 2, 12, 10\), expected \[N, H, Dk, Dv\]=\[2"
    ):
        retention(
            **{**inputs, "initial_state": torch.zeros(1, H, DK, DV)}, cu_seqlens=torch.tensor([0, 2, 6])
        )
    with pytest.raises(ValueError, match="chunk_size=24, expected a power of 2"):
        retention(**inputs, chunk_size=24, backend="triton")


def test_step_invalid_arguments():
    q = torch.zeros(2, H, DK)
    v = torch.zeros(2, H, DV)
    state = torch.zeros(2, H, DK, DV)
    with pytest.raises(ValueError, match="state has shape"):
        retention_step(q, q, v, torch.zeros(H), state[:, :, :, :3])
    with pytest.raises(ValueError, match="decay has shape"):
        retention_step(q, q, v, torch.zeros(3), state)
    with pytest.raises(ValueError, match="q has shape"):
        retention_step(torch.zeros(2, 4, H, DK), q, v, torch.zeros(H), state)


# ------------------------------------------------------------------------------------------- row sums


def with_key_sum_column(inputs: dict) -> dict:
    """The inputs of a call with ``output_row_sum``: the state gains the key-sum column."""
    B = inputs["q"].shape[0]
    out = dict(inputs)
    if inputs.get("initial_state") is not None:
        out["initial_state"] = torch.cat(
            [inputs["initial_state"], torch.randn(B, H, DK, 1, dtype=torch.float64)], -1
        )
    return out


def row_sum_reference(q, k, v, decay, initial_state=None, cu_seqlens=None):
    """The oracle on v with a channel of ones appended: its last output channel is the row sum, its last state
    column the key sum; both detached, as the op returns them."""
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype)
    out, state = retention(
        q,
        k,
        torch.cat([v, ones], -1),
        decay,
        initial_state=initial_state,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        backend="naive",
    )
    state = torch.cat([state[..., :DV], state[..., DV:].detach()], -1)
    return out[..., :DV], state, out[..., DV].detach()


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("T", [1, 64, 100])
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_row_sums(backend, T, decay_kind):
    """output_row_sum: the output, state and gradients as without it, plus the row sums and the key-sum state."""
    inputs = with_key_sum_column(make_inputs(T, decay_kind))
    fn = functools.partial(op(backend, 16), output_row_sum=True)
    check_forward_backward(
        fn, row_sum_reference, inputs, dtype=BACKEND_DTYPE[backend], what=f"{backend} T={T}"
    )
    out, _, sums = fn(**{n: x.to(BACKEND_DTYPE[backend]) for n, x in inputs.items()})
    assert sums.shape == (2, T, H) and not sums.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_sums_chain_and_pack(backend):
    """Two halves chained through the (Dk, Dv + 1) state, and packed sequences, give the row sums of the whole."""
    dtype = BACKEND_DTYPE[backend]
    inputs = {n: x.to(dtype) for n, x in with_key_sum_column(make_inputs(96, "fixed", B=1)).items()}
    whole = retention(**inputs, output_final_state=True, output_row_sum=True, backend=backend, chunk_size=16)
    first = {n: (x[:, :40] if n in ("q", "k", "v") else x) for n, x in inputs.items()}
    second = {n: (x[:, 40:] if n in ("q", "k", "v") else x) for n, x in inputs.items()}
    _, state, sums_a = retention(
        **first, output_final_state=True, output_row_sum=True, backend=backend, chunk_size=16
    )
    _, final, sums_b = retention(
        **{**second, "initial_state": state},
        output_final_state=True,
        output_row_sum=True,
        backend=backend,
        chunk_size=16,
    )
    tol = TOLERANCE[dtype]
    assert rel_err(torch.cat([sums_a, sums_b], 1), whole[2]) < tol and rel_err(final, whole[1]) < tol
    # packed: three documents, each starting from its own state
    cu = torch.tensor([0, 30, 31, 96])
    states = torch.randn(3, H, DK, DV + 1, dtype=dtype)
    out, packed_final, sums = retention(
        **{**inputs, "initial_state": states},
        cu_seqlens=cu,
        output_final_state=True,
        output_row_sum=True,
        backend=backend,
        chunk_size=16,
    )
    for n in range(3):
        bos, eos = cu[n].item(), cu[n + 1].item()
        part = {x: inputs[x][:, bos:eos] for x in ("q", "k", "v")}
        o, s, r = row_sum_reference(
            **{n_: t.double() for n_, t in part.items()},
            decay=inputs["decay"].double(),
            initial_state=states[n : n + 1].double(),
        )
        assert rel_err(out[:, bos:eos], o) < tol and rel_err(sums[:, bos:eos], r) < tol
        assert rel_err(packed_final[n : n + 1], s) < tol


def test_row_sums_state_shape_is_checked():
    inputs = make_inputs(6, "fixed")  # a (Dk, Dv) state, no key-sum column
    with pytest.raises(ValueError, match=r"initial_state has shape .*\[N, H, Dk, Dv \+ 1\]"):
        retention(**inputs, output_row_sum=True, backend="torch")


# ------------------------------------------------------------------------------------------- packed documents

# With chunk 16: documents shorter than a chunk, three starting inside chunk 0 (at 0, 5, 6), starts exactly at
# chunk boundaries (16, 32, 48), length-1 documents, documents spanning two or three chunks, and a padded tail
# (T = 107).
PACKED_LENGTHS = (5, 1, 10, 3, 3, 10, 16, 1, 30, 2, 17, 9)


def packed_inputs(
    lengths: tuple[int, ...], decay_kind: str, *, initial_state: bool, row_sum: bool = False, gate_scale=1.0
) -> dict:
    """One packed row (B = 1) of documents of the given lengths, with one initial state per document."""
    inputs = make_inputs(sum(lengths), decay_kind, B=1, initial_state=False, gate_scale=gate_scale)
    inputs.pop("initial_state")
    if initial_state:
        inputs["initial_state"] = torch.randn(len(lengths), H, DK, DV + int(row_sum), dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return inputs


def packed_reference(row_sum: bool):
    """The oracle, one document at a time; with ``row_sum`` its row sums and key-sum state from a ones channel."""
    return row_sum_reference if row_sum else naive_op()


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("row_sum", [False, True], ids=["plain", "row_sum"])
@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("chunk_size", [16, 37, 64])
def test_packed_documents_equal_the_oracle(chunk_size, decay_kind, row_sum, initial_state):
    """torch, packed documents in one pass: output, per-document final states, row sums, and the gradients of
    q, k, v, the decay and the per-document initial states against the naive oracle run per document."""
    inputs = packed_inputs(PACKED_LENGTHS, decay_kind, initial_state=initial_state, row_sum=row_sum)
    fn = functools.partial(op("torch", chunk_size), output_row_sum=row_sum)
    what = f"packed C={chunk_size} {decay_kind} row_sum={row_sum} h0={initial_state}"
    check_forward_backward(fn, packed_reference(row_sum), inputs, what=what)
    outputs = fn(**inputs)
    assert outputs[1].shape == (len(PACKED_LENGTHS), H, DK, DV + int(row_sum))


@pytest.mark.parametrize("row_sum", [False, True], ids=["plain", "row_sum"])
@pytest.mark.parametrize("decay_kind", DECAYS)
def test_packed_documents_equal_separate_calls(decay_kind, row_sum):
    """The same documents packed and run separately through the torch backend: outputs, final states, grads."""
    shared = make_inputs(1, decay_kind, B=1)["decay"]
    sequences = []
    for T in PACKED_LENGTHS:
        seq = make_inputs(T, decay_kind, B=1)
        if row_sum:
            seq = with_key_sum_column(seq)
        if decay_kind == "fixed":
            seq["decay"] = shared
        sequences.append(seq)
    fn = functools.partial(op("torch", 16), output_row_sum=row_sum)
    check_varlen(fn, sequences, seq_dims=seq_dims(decay_kind), tol=TOLERANCE[torch.float64], what="torch")


@pytest.mark.parametrize("keep", [True, False])
def test_packed_backward_with_kept_or_recomputed_states(monkeypatch, keep):
    """The recomputed chunk states of the backward include the initial states of documents starting mid-chunk."""
    from zoo.ops.retention import chunk

    monkeypatch.setattr(chunk, "keep_chunk_states", lambda *sizes: keep)
    inputs = packed_inputs(PACKED_LENGTHS, "gated", initial_state=True)
    check_forward_backward(op("torch", 16), naive_op(), inputs, what=f"packed keep={keep}")


def test_packed_empty_documents():
    """Empty documents (repeated cu_seqlens) pass their initial state on as their final state."""
    inputs = packed_inputs((0, 7, 0, 20, 1, 0), "gated", initial_state=True)
    check_forward_backward(op("torch", 16), naive_op(), inputs, what="packed, empty documents")


@pytest.mark.parametrize("decay_kind", DECAYS)
def test_packed_documents_without_states(decay_kind):
    """Packed training as a model runs it: no initial state, no final state, row sums on."""
    inputs = packed_inputs(PACKED_LENGTHS, decay_kind, initial_state=False)
    fn = functools.partial(op("torch", 16, output_final_state=False), output_row_sum=True)

    def ref(**kw):
        out, _, sums = row_sum_reference(**kw)
        return out, None, sums

    check_forward_backward(fn, ref, inputs, what="packed, no states")


def test_packed_strongly_decaying_gates_stay_finite():
    """Log-gates down to -60 per token across document boundaries: the masked exponents must not overflow."""
    inputs = packed_inputs(PACKED_LENGTHS, "gated", initial_state=True, gate_scale=30.0)
    inputs["decay"][:, ::7] = -60.0
    errors = check_forward_backward(op("torch", 16), naive_op(), inputs, what="packed, strong decay")
    assert all(math.isfinite(e) for e in errors.values())


def test_packed_documents_are_one_pass(monkeypatch):
    """The torch backend does not fall back to one call per document for packed sequences."""
    from zoo.ops.retention import chunk, naive

    def no_loop(*args, **kwargs):
        raise AssertionError("per-document loop")

    monkeypatch.setattr(naive, "per_sequence", no_loop)
    monkeypatch.setattr(chunk, "per_sequence", no_loop, raising=False)
    inputs = packed_inputs(PACKED_LENGTHS, "fixed", initial_state=True, row_sum=True)
    out, state, sums = retention(
        **inputs, backend="torch", chunk_size=16, output_final_state=True, output_row_sum=True
    )
    assert out.shape == (1, sum(PACKED_LENGTHS), H, DV) and state.shape[0] == len(PACKED_LENGTHS)
