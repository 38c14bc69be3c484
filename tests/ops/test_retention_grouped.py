"""Retention with grouped q and k (zoo.ops.retention): G heads of q and k shared by the H heads of v, head h reading
group h // (H / G), as Mamba-2's SSD shares B and C among the heads of a group (Dao & Gu 2024, arXiv:2405.21060).

Every form runs on the grouped tensors and is compared, through harness.py, with the naive oracle run on q and k
repeated to H heads here in the test: forward and every gradient (the gradients of grouped q and k are the sums over
their heads), state chaining, packed sequences, the one-token step. torch in float64 (tolerance 1e-11), triton in
float32 under the CPU interpreter (5e-5), at small sizes.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.ops.retention import retention, retention_step

from .harness import (
    TOLERANCE,
    check_forward_backward,
    check_state_chaining,
    check_step,
    check_varlen,
    rel_err,
)

# four heads of v in two groups of q and k (and one group for all, as Mamba-2 with n_groups = 1); odd head dims
H, DK, DV = 4, 12, 10
BACKEND_DTYPE = {"naive": torch.float64, "torch": torch.float64, "triton": torch.float32}


def make_inputs(T: int, G: int, decay_kind: str = "gated", *, B: int = 2, initial_state: bool = True) -> dict:
    """float64 inputs with grouped q, k (B, T, G, Dk); the harness casts them per backend."""
    inputs = {
        "q": torch.randn(B, T, G, DK, dtype=torch.float64),
        "k": torch.randn(B, T, G, DK, dtype=torch.float64),
        "v": torch.randn(B, T, H, DV, dtype=torch.float64),
    }
    if decay_kind == "fixed":
        inputs["decay"] = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))  # (H,)
    else:
        inputs["decay"] = F.logsigmoid(2 * torch.randn(B, T, H, dtype=torch.float64) + 2)  # (B, T, H)
    if initial_state:
        inputs["initial_state"] = torch.randn(B, H, DK, DV, dtype=torch.float64)
    return inputs


def seq_dims(decay_kind: str = "gated") -> dict[str, int]:
    return {"q": 1, "k": 1, "v": 1, **({"decay": 1} if decay_kind == "gated" else {})}


def op(backend: str, chunk_size: int | None = 16, **kwargs):
    return functools.partial(
        retention, backend=backend, chunk_size=chunk_size, output_final_state=True, **kwargs
    )


def expanded(q: torch.Tensor, k: torch.Tensor, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, T, G, Dk) written out per head of v: head h gets group h // (H / G)."""
    G = q.shape[2]
    index = torch.arange(H) // (H // G)
    return q[:, :, index], k[:, :, index]


def reference(
    q, k, v, decay, initial_state=None, cu_seqlens=None, output_row_sum=False, output_final_state=True
):
    """The naive oracle on q and k expanded to every head; with ``output_row_sum`` its row sums and key sums from
    a channel of ones appended to v (both detached, as the op returns them)."""
    q, k = expanded(q, k, v.shape[2])
    if not output_row_sum:
        return retention(
            q, k, v, decay, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens,
            backend="naive",
        )  # fmt: skip
    Dv = v.shape[-1]
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype)
    out, state = retention(
        q, k, torch.cat([v, ones], -1), decay, initial_state=initial_state, output_final_state=True,
        cu_seqlens=cu_seqlens, backend="naive",
    )  # fmt: skip
    return out[..., :Dv], torch.cat([state[..., :Dv], state[..., Dv:].detach()], -1), out[..., Dv].detach()


@pytest.mark.parametrize("decay_kind", ["fixed", "gated"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize(("T", "chunk_size"), [(1, 16), (63, 16), (100, 32), (64, 64)])
def test_torch_forward_backward(T, chunk_size, G, decay_kind):
    inputs = make_inputs(T, G, decay_kind)
    check_forward_backward(
        op("torch", chunk_size), reference, inputs, what=f"torch G={G} T={T} C={chunk_size}"
    )


@pytest.mark.parametrize("G", [1, 2])
def test_naive_forward_backward(G):
    """The oracle takes grouped q, k too (it repeats them itself)."""
    inputs = make_inputs(20, G)
    check_forward_backward(op("naive"), reference, inputs, what=f"naive G={G}")


@pytest.mark.parametrize(("G", "decay_kind", "T"), [(1, "gated", 40), (2, "fixed", 33)])
def test_triton_forward_backward(G, decay_kind, T):
    inputs = make_inputs(T, G, decay_kind)
    check_forward_backward(
        op("triton"), reference, inputs, dtype=torch.float32, what=f"triton G={G} {decay_kind} T={T}"
    )


def test_grouped_equals_expanded_with_gates_without_gradient():
    """Gates that need no gradient (the chunked backward then skips the gate terms): the gradients of grouped q, k
    are those of the expanded ones summed over each group's heads; v and the initial state's are equal."""
    inputs = make_inputs(50, 1)
    grouped = {n: x.clone().requires_grad_(n != "decay") for n, x in inputs.items()}
    q_h, k_h = (x.detach().clone().requires_grad_() for x in expanded(inputs["q"], inputs["k"], H))
    plain = {
        **{n: x.detach().clone().requires_grad_(n != "decay") for n, x in inputs.items()},
        "q": q_h,
        "k": k_h,
    }
    out_g, state_g = op("torch")(**grouped)
    out_e, state_e = op("torch")(**plain)
    w_out, w_state = torch.randn_like(out_e), torch.randn_like(state_e)
    names = ("q", "k", "v", "initial_state")
    grads_g = torch.autograd.grad(
        (out_g * w_out).sum() + (state_g * w_state).sum(), [grouped[n] for n in names]
    )
    grads_e = torch.autograd.grad(
        (out_e * w_out).sum() + (state_e * w_state).sum(), [plain[n] for n in names]
    )
    grads_e = [grads_e[0].sum(2, keepdim=True), grads_e[1].sum(2, keepdim=True), *grads_e[2:]]
    errors = {"out": rel_err(out_g, out_e), "state": rel_err(state_g, state_e)}
    errors |= {f"d{n}": rel_err(a, b) for n, a, b in zip(names, grads_g, grads_e)}
    assert max(errors.values()) < TOLERANCE[torch.float64], errors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_sums(backend):
    """output_row_sum with grouped q, k: the row sums and the key-sum column of the state."""
    inputs = make_inputs(40, 2)
    inputs["initial_state"] = torch.randn(2, H, DK, DV + 1, dtype=torch.float64)
    fn = op(backend, output_row_sum=True)
    check_forward_backward(
        fn, functools.partial(reference, output_row_sum=True), inputs, dtype=BACKEND_DTYPE[backend],
        what=f"{backend} row sums",
    )  # fmt: skip


@pytest.mark.parametrize("keep", [True, False])
def test_torch_backward_with_kept_or_recomputed_states(monkeypatch, keep):
    from zoo.ops.retention import chunk

    monkeypatch.setattr(chunk, "keep_chunk_states", lambda *sizes: keep)
    check_forward_backward(op("torch"), reference, make_inputs(70, 2), what=f"keep={keep}")


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("G", [1, 2])
def test_torch_without_states(monkeypatch, G, keep):
    """Training's call: no initial state, no final state (its gradient then is None); states kept or recomputed."""
    from zoo.ops.retention import chunk

    monkeypatch.setattr(chunk, "keep_chunk_states", lambda *sizes: keep)
    inputs = make_inputs(37, G, initial_state=False)

    def fn(**kw):
        out, state = retention(**kw, backend="torch", chunk_size=16)
        assert state is None
        return out

    check_forward_backward(fn, lambda **kw: reference(**kw)[0], inputs, what=f"torch G={G} keep={keep}")


@pytest.mark.parametrize("chunks_per_segment", [1, 2, 3])
@pytest.mark.parametrize("G", [1, 2])
def test_torch_segments(monkeypatch, G, chunks_per_segment):
    """The grouped torch form runs through segments of chunks (the last one shorter where they do not divide the
    chunks): forward, final state and every gradient against the oracle, with states kept or recomputed."""
    from zoo.ops.retention import chunk, grouped

    B, C = 2, 16
    monkeypatch.setattr(grouped, "SEGMENT_ELEMENTS", chunks_per_segment * B * H * C * max(C, DV))
    monkeypatch.setattr(chunk, "keep_chunk_states", lambda *sizes: chunks_per_segment != 2)
    inputs = make_inputs(75, G, B=B)  # 5 chunks
    check_forward_backward(
        op("torch", C), reference, inputs, what=f"G={G} {chunks_per_segment} chunks per segment"
    )
    # with the values' scale and the skip (Mamba-2's dt and D), some (chunk, head) pairs exact
    monkeypatch.setattr(grouped, "FACTORED_RANGE_SHARE", 0.002)
    inputs["v_scale"] = torch.rand(B, 75, H, dtype=torch.float64) + 0.1
    inputs["skip"] = torch.randn(H, dtype=torch.float64)
    check_forward_backward(
        op("torch", C), _scaled_reference, inputs, what=f"G={G} {chunks_per_segment} per segment, v_scale, skip"
    )


def _exact_pairs(monkeypatch) -> list[int]:
    """Record, for every torch call, how many (chunk, head) pairs the intra-chunk product did exactly (with their
    masks) instead of factored."""
    from zoo.ops.retention import grouped

    counts: list[int] = []
    init = grouped._Intra.__init__

    def counting(self, *args, **kwargs):
        init(self, *args, **kwargs)
        counts.append(0 if self.pairs is None else len(self.pairs[0]))

    monkeypatch.setattr(grouped._Intra, "__init__", counting)
    return counts


@pytest.mark.parametrize("share", [0.002, 0.0], ids=["mixed", "all_exact"])
@pytest.mark.parametrize("G", [1, 2])
def test_torch_exact_and_factored_chunks(monkeypatch, G, share):
    """The intra-chunk decays are factored as exp(b_i - r) exp(r - b_j) where a chunk's decay allows it, and done
    exactly per (chunk, head) elsewhere: with the limit lowered so that some pairs (or all) take the exact form, the
    output, final state and every gradient still equal the oracle at float64's tolerance."""
    from zoo.ops.retention import grouped

    monkeypatch.setattr(grouped, "FACTORED_RANGE_SHARE", share)
    counts = _exact_pairs(monkeypatch)
    inputs = make_inputs(75, G)  # 5 chunks of 16, 4 heads: 40 (chunk, head) pairs with B = 2
    check_forward_backward(op("torch"), reference, inputs, what=f"G={G} share={share}")
    pairs = 2 * 5 * H
    assert counts and all(0 < n <= pairs for n in counts)
    if share == 0.0:
        assert all(n == pairs for n in counts)
    else:
        assert all(n < pairs for n in counts), counts


def test_torch_strongly_decaying_gates_in_float32(monkeypatch):
    """float32, per-token log-gates down to -60 on some heads: their chunks' factors would leave the float range, so
    those (chunk, head) pairs are done exactly; everything stays finite and equals the float64 oracle."""
    counts = _exact_pairs(monkeypatch)
    inputs = make_inputs(80, 1)
    inputs["decay"][:, ::7, 1] = -60.0
    inputs["decay"][:, :, 3] *= 30.0
    errors = check_forward_backward(
        op("torch"), reference, inputs, dtype=torch.float32, tol=2e-4, what="strong decay"
    )
    assert all(math.isfinite(e) for e in errors.values())
    assert counts and all(0 < n < 2 * 5 * H for n in counts), counts


def _scaled_reference(v, v_scale=None, skip=None, **kwargs):
    """The oracle on the values v * v_scale, multiplied out here, plus skip[h] * v on the output."""
    out, state = reference(v=v if v_scale is None else v * v_scale[..., None], **kwargs)
    return (out if skip is None else out + v * skip[:, None]), state


@pytest.mark.parametrize("with_skip", [False, True], ids=["", "skip"])
@pytest.mark.parametrize(
    ("backend", "G", "share"),
    [("torch", 1, None), ("torch", 2, None), ("torch", 2, 0.002), ("naive", 2, None), ("triton", 1, None)],
    ids=["torch-G1", "torch-G2", "torch-G2-exact-pairs", "naive", "triton"],
)
def test_v_scale_and_skip(monkeypatch, backend, G, share, with_skip):
    """``v_scale`` (Mamba-2's time steps): the values are v * v_scale; ``skip`` (Mamba-2's D) adds skip[h] * v to
    the output. The torch grouped form folds the scale into its decay factors (with some (chunk, head) pairs done
    exactly when ``share`` is lowered) and adds the skip in its passes; the others multiply first and add after.
    Output, final state and every gradient, the scale's and the skip's included, equal the oracle."""
    from zoo.ops.retention import grouped

    if share is not None:
        monkeypatch.setattr(grouped, "FACTORED_RANGE_SHARE", share)
    inputs = make_inputs(75, G)
    inputs["v_scale"] = torch.rand(2, 75, H, dtype=torch.float64) + 0.1
    if with_skip:
        inputs["skip"] = torch.randn(H, dtype=torch.float64)
    dtype = BACKEND_DTYPE[backend]
    check_forward_backward(op(backend), _scaled_reference, inputs, dtype=dtype, what=f"{backend} G={G}")


@pytest.mark.parametrize("gated", [True, False], ids=["gates", "gates-without-gradient"])
def test_skip_without_v_scale(gated):
    """``skip`` alone on the grouped torch form, with and without a gradient for the gates (the backward then
    skips the gates' terms): equal to the oracle."""
    inputs = make_inputs(40, 1)
    inputs["skip"] = torch.randn(H, dtype=torch.float64)
    fn = op("torch")
    if not gated:
        decay = inputs.pop("decay")
        fn = functools.partial(fn, decay=decay)
        ref = functools.partial(_scaled_reference, decay=decay)
    else:
        ref = _scaled_reference
    check_forward_backward(fn, ref, inputs, what=f"skip gated={gated}")


def test_v_scale_and_skip_with_packed_documents():
    """Packed documents take the per-document route, with the scale multiplied in first and the skip added after:
    equal to the oracle."""
    lengths = (5, 30, 17)
    inputs = make_inputs(sum(lengths), 1, B=1, initial_state=False)
    inputs["initial_state"] = torch.randn(len(lengths), H, DK, DV, dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs["v_scale"] = torch.rand(1, sum(lengths), H, dtype=torch.float64)
    inputs["skip"] = torch.randn(H, dtype=torch.float64)
    check_forward_backward(op("torch"), _scaled_reference, inputs, what="packed v_scale")


def test_v_scale_and_skip_shapes_are_checked():
    inputs = make_inputs(5, 2)
    with pytest.raises(ValueError, match=r"v_scale has shape \(2, 5, 3\), expected \[B, T, H\]=\[2, 5, 4\]"):
        retention(**inputs, v_scale=torch.ones(2, 5, 3, dtype=torch.float64), backend="torch")
    with pytest.raises(ValueError, match="v_scale has dtype torch.int64"):
        retention(**inputs, v_scale=torch.ones(2, 5, 4, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match=r"skip has shape \(2,\), expected \[H\]=\[4\]"):
        retention(**inputs, skip=torch.ones(2, dtype=torch.float64), backend="naive")


def test_torch_low_precision_inputs():
    """bfloat16 q, k, v and gates in, bfloat16 out and gradients, float32 state; close to the float32 oracle at
    bfloat16's resolution."""
    inputs = make_inputs(40, 1)
    low = {
        n: (x.float() if n == "initial_state" else x.bfloat16()).requires_grad_() for n, x in inputs.items()
    }
    high = {n: x.detach().float().requires_grad_() for n, x in low.items()}
    out, state = op("torch")(**low)
    ref, ref_state = reference(**high)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(out, ref) < 2e-2 and rel_err(state, ref_state) < 2e-2
    w_out, w_state = torch.randn_like(ref), torch.randn_like(ref_state)
    ((out.float() * w_out).sum() + (state * w_state).sum()).backward()
    ((ref * w_out).sum() + (ref_state * w_state).sum()).backward()
    for name, x in low.items():
        assert x.grad.dtype == x.dtype, name
        assert rel_err(x.grad, high[name].grad) < 5e-2, name


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_state_chaining(backend):
    dtype = BACKEND_DTYPE[backend]
    inputs = {n: x.to(dtype) for n, x in make_inputs(90, 1).items()}
    check_state_chaining(
        op(backend), inputs, split=37, seq_dims=seq_dims(), tol=TOLERANCE[dtype], what=backend
    )


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_varlen(backend):
    """Packed sequences (lengths 17, 1, 40, 9; chunk 16) equal separate calls, gradients included."""
    dtype = BACKEND_DTYPE[backend]
    sequences = [{n: x.to(dtype) for n, x in make_inputs(T, 2, B=1).items()} for T in (17, 1, 40, 9)]
    check_varlen(op(backend), sequences, seq_dims=seq_dims(), tol=TOLERANCE[dtype], what=backend)


@pytest.mark.parametrize("row_sum", [False, True], ids=["plain", "row_sum"])
@pytest.mark.parametrize("decay_kind", ["fixed", "gated"])
def test_torch_packed_documents_equal_the_oracle(decay_kind, row_sum):
    """torch, packed documents starting and ending inside chunks, at chunk boundaries, and empty, each with its own
    initial state: output, per-document final states, row sums and every gradient against the per-document oracle
    on expanded q, k."""
    lengths = (5, 1, 10, 0, 16, 30, 2, 17)
    inputs = make_inputs(sum(lengths), 1, decay_kind, B=1, initial_state=False)
    inputs["initial_state"] = torch.randn(len(lengths), H, DK, DV + int(row_sum), dtype=torch.float64)
    inputs["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    fn = op("torch", output_row_sum=row_sum)
    check_forward_backward(
        fn, functools.partial(reference, output_row_sum=row_sum), inputs, what=f"packed {decay_kind}"
    )


@pytest.mark.parametrize("layout", ["BHD", "B1HD"])
@pytest.mark.parametrize("G", [1, 2])
def test_step_equals_forward(G, layout):
    """Decoding token by token with grouped q, k ([B, G, Dk] or [B, 1, G, Dk]) equals the full forward."""
    inputs = make_inputs(30, G)

    def step(token, state):
        q, k, v, decay = token["q"], token["k"], token["v"], token["decay"]
        if layout == "BHD":
            q, k, v, decay = q[:, 0], k[:, 0], v[:, 0], decay[:, 0]
        out, state = retention_step(q, k, v, decay, state)
        return (out[:, None] if layout == "BHD" else out), state

    check_step(reference, step, inputs, seq_dims=seq_dims(), tol=TOLERANCE[torch.float64], what=f"G={G}")


def test_step_continues_a_triton_prefill():
    """A model's decoding: prefill with the triton kernels on grouped q, k, then step; equals the oracle."""
    inputs = {n: x.float() for n, x in make_inputs(24, 1).items()}
    full, _ = reference(**{n: x.double() for n, x in inputs.items()})
    prefill = {
        **{n: inputs[n][:, :16] for n in ("q", "k", "v", "decay")},
        "initial_state": inputs["initial_state"],
    }
    prefix, state = retention(**prefill, output_final_state=True, backend="triton", chunk_size=16)
    outs = [prefix]
    for t in range(16, 24):
        o, state = retention_step(*(inputs[n][:, t] for n in ("q", "k", "v", "decay")), state)
        outs.append(o[:, None])
    assert rel_err(torch.cat(outs, dim=1), full) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_groups_must_divide_the_heads(backend):
    inputs = make_inputs(5, 3)  # 3 groups for 4 heads
    with pytest.raises(ValueError, match=r"H=4 heads, but q and k have G=3: G must divide H"):
        retention(**inputs, backend=backend)
    with pytest.raises(ValueError, match="k has shape"):
        retention(
            **{**make_inputs(5, 2), "k": torch.randn(2, 5, 1, DK, dtype=torch.float64)}, backend=backend
        )


def test_step_groups_must_divide_the_heads():
    q = torch.zeros(2, 3, DK)
    with pytest.raises(ValueError, match=r"retention_step: .*H=4 heads, but q and k have G=3"):
        retention_step(q, q, torch.zeros(2, H, DV), torch.zeros(H), torch.zeros(2, H, DK, DV))
