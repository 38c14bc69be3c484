"""The op test harness: every fast form of every op in ``zoo.ops`` is checked against its naive oracle.

An op is any callable ``fn(**inputs) -> out`` or ``-> (out, final_state, ...)``; ``inputs`` is a dict of
tensors and plain arguments built by the op's own test file (its input factory). The checks are generic:

- ``check_forward_backward``: every output and the gradient of every floating input (initial state and decay
  included) against the reference, in relative error ``rel_err`` under a stated tolerance.
- ``check_state_chaining``: two halves, the second starting from the first's final state, equal the whole.
- ``check_varlen``: sequences packed along time with ``cu_seqlens`` equal separate calls, forward and backward.
- ``check_step``: decoding token by token with the op's ``*_step`` equals the full forward.

Tolerances (relative error, ``TOLERANCE``): 1e-5 for a float64 run against the float64 oracle; 1e-3 for a
float32 run (Triton under the CPU interpreter) against the float64 oracle.

Recurrent ops follow the fla convention: ``initial_state``/``output_final_state``/``cu_seqlens`` keywords,
outputs ``(out, final_state)`` with ``out`` batch-first and time on axis 1 (``seq_dims`` says where time is in
each input).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}

Inputs = Mapping[str, Any]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (plain ‖a − b‖ when b is zero, so that zero == zero passes)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(errors: dict[str, float], tol: float, what: str) -> None:
    """Fail listing every quantity over ``tol``, and all errors for context."""
    bad = {name: err for name, err in errors.items() if not err < tol}  # `not <` also catches nan
    summary = ", ".join(f"{name}={err:.2e}" for name, err in errors.items())
    assert not bad, f"{what}: relative error over {tol:.0e} for {sorted(bad)} ({summary})"


def clone_inputs(
    inputs: Inputs, dtype: torch.dtype | None = None, requires_grad: bool = True
) -> dict[str, Any]:
    """Fresh leaves: floating tensors cast to ``dtype`` (if given), requiring grad; the rest as they are."""
    out: dict[str, Any] = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().to(dtype or x.dtype).clone().requires_grad_(requires_grad)
        out[name] = x
    return out


def _as_tuple(outputs: Any) -> tuple[torch.Tensor | None, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _weights(outputs: Sequence[torch.Tensor | None], seed: int = 1234) -> list[torch.Tensor | None]:
    """Fixed random cotangents, one per output, so that every element of every output reaches the grads."""
    gen = torch.Generator().manual_seed(seed)
    return [
        None if o is None else torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
        for o in outputs
    ]


def _loss(outputs: Sequence[torch.Tensor | None], weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
    terms = [(o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights) if o is not None]
    return torch.stack([t.double() for t in terms]).sum()


def _grads(loss: torch.Tensor, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


def _float_leaves(inputs: Inputs) -> dict[str, torch.Tensor]:
    return {n: x for n, x in inputs.items() if isinstance(x, torch.Tensor) and x.requires_grad}


def check_forward_backward(
    fn: Callable[..., Any],
    ref: Callable[..., Any],
    inputs: Inputs,
    *,
    dtype: torch.dtype | None = None,
    tol: float | None = None,
    what: str = "",
) -> dict[str, float]:
    """Compare ``fn`` (run in ``dtype``) with ``ref`` (in float64): every output, then every input's grad.

    ``inputs`` is the op's input dict; all floating tensors in it are differentiated. The loss is a fixed
    random projection of all outputs. Returns the relative errors by name (``out0``, ``out1``, ...,
    ``d<input>``).
    """
    dtype = dtype or torch.float64
    tol = TOLERANCE[dtype] if tol is None else tol
    ref_in = clone_inputs(inputs, torch.float64)
    fn_in = clone_inputs(inputs, dtype)
    ref_out = _as_tuple(ref(**ref_in))
    fn_out = _as_tuple(fn(**fn_in))
    assert len(ref_out) == len(fn_out), f"{what}: {len(fn_out)} outputs, the reference has {len(ref_out)}"

    errors: dict[str, float] = {}
    for i, (a, b) in enumerate(zip(fn_out, ref_out)):
        assert (a is None) == (b is None), f"{what}: output {i} is None in one form only"
        if b is not None:
            errors[f"out{i}"] = rel_err(a, b)
    weights = _weights(ref_out)
    ref_grads = _grads(_loss(ref_out, weights), _float_leaves(ref_in))
    fn_grads = _grads(_loss(fn_out, weights), _float_leaves(fn_in))
    for name, b in ref_grads.items():
        a = fn_grads[name]
        assert b is not None, f"{what}: the reference gives no gradient for {name}"
        assert a is not None, f"{what}: no gradient for {name}"
        assert a.dtype == fn_in[name].dtype, (
            f"{what}: d{name} has dtype {a.dtype}, its input {fn_in[name].dtype}"
        )
        errors[f"d{name}"] = rel_err(a, b)
    assert_close(errors, tol, what or "forward/backward")
    return errors


def _slice_time(inputs: Inputs, seq_dims: Mapping[str, int], start: int, stop: int) -> dict[str, Any]:
    out = dict(inputs)
    for name, dim in seq_dims.items():
        if isinstance(inputs.get(name), torch.Tensor):
            out[name] = inputs[name].narrow(dim, start, stop - start)
    return out


def check_state_chaining(
    fn: Callable[..., Any],
    inputs: Inputs,
    *,
    split: int,
    seq_dims: Mapping[str, int],
    tol: float,
    state_key: str = "initial_state",
    what: str = "",
) -> dict[str, float]:
    """Run the whole sequence, then [0, split) and [split, T) with the first half's final state passed on.

    Outputs (``out`` on time axis 1) and final states must agree; ``inputs`` must hold ``state_key``.
    """
    whole_out, whole_state = fn(**inputs, output_final_state=True)[:2]
    T = whole_out.shape[1]
    first_out, mid_state = fn(**_slice_time(inputs, seq_dims, 0, split), output_final_state=True)[:2]
    second_in = _slice_time(inputs, seq_dims, split, T)
    second_in[state_key] = mid_state
    second_out, last_state = fn(**second_in, output_final_state=True)[:2]
    errors = {
        "out": rel_err(torch.cat([first_out, second_out], dim=1), whole_out),
        "final_state": rel_err(last_state, whole_state),
    }
    assert_close(errors, tol, what or "state chaining")
    return errors


def check_varlen(
    fn: Callable[..., Any],
    sequences: Sequence[Inputs],
    *,
    seq_dims: Mapping[str, int],
    tol: float,
    batch_keys: Sequence[str] = ("initial_state",),
    what: str = "",
) -> dict[str, float]:
    """Packed sequences (batch 1, ``cu_seqlens``) equal separate calls: outputs, final states, gradients.

    ``sequences`` are per-sequence input dicts with batch 1. Inputs in ``seq_dims`` are concatenated along
    time, those in ``batch_keys`` along the batch axis (one row per sequence); anything else (e.g. a per-head
    decay) is shared and taken from the first sequence. The packed tensors are built from the same leaves as
    the separate calls, so the gradients of the two runs can be compared leaf by leaf.
    """
    leaves = [clone_inputs(s) for s in sequences]
    shared = {n: x for n, x in leaves[0].items() if n not in seq_dims and n not in batch_keys}
    for seq in leaves:
        seq.update(shared)

    separate = [fn(**seq, output_final_state=True)[:2] for seq in leaves]
    lengths = [out.shape[1] for out, _ in separate]
    device = separate[0][0].device
    cu_seqlens = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device
    )
    packed_in = dict(shared)
    for name, dim in seq_dims.items():
        packed_in[name] = torch.cat([seq[name] for seq in leaves], dim=dim)
    for name in batch_keys:
        if leaves[0].get(name) is not None:
            packed_in[name] = torch.cat([seq[name] for seq in leaves], dim=0)
    packed_out, packed_state = fn(**packed_in, output_final_state=True, cu_seqlens=cu_seqlens)[:2]

    sep_out = torch.cat([o for o, _ in separate], dim=1)
    sep_state = torch.cat([s for _, s in separate], dim=0)
    errors = {"out": rel_err(packed_out, sep_out), "final_state": rel_err(packed_state, sep_state)}

    w_out, w_state = _weights([sep_out, sep_state])
    all_leaves = {f"{n}[{i}]": x for i, seq in enumerate(leaves) for n, x in _float_leaves(seq).items()}
    g_sep = _grads(_loss([sep_out, sep_state], [w_out, w_state]), all_leaves)
    g_packed = _grads(_loss([packed_out, packed_state], [w_out, w_state]), all_leaves)
    for name in all_leaves:
        if g_sep[name] is not None or g_packed[name] is not None:
            assert g_sep[name] is not None and g_packed[name] is not None, f"{what}: {name} lost its gradient"
            errors[f"d{name}"] = rel_err(g_packed[name], g_sep[name])
    assert_close(errors, tol, what or "varlen")
    return errors


def check_step(
    fn: Callable[..., Any],
    step_fn: Callable[[dict[str, Any], torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    inputs: Inputs,
    *,
    seq_dims: Mapping[str, int],
    tol: float,
    state_key: str = "initial_state",
    what: str = "",
) -> dict[str, float]:
    """Decoding token by token, ``step_fn(token_inputs, state) -> (out_t, state)``, equals the full forward.

    ``token_inputs`` are ``inputs`` sliced to one token along time (the time axis kept, length 1), without
    ``state_key``; the first state is ``inputs[state_key]``. ``out_t`` has time on axis 1 with length 1.
    """
    with torch.no_grad():
        full_out, full_state = fn(**inputs, output_final_state=True)[:2]
        state = inputs[state_key]
        outs = []
        for t in range(full_out.shape[1]):
            token = _slice_time(inputs, seq_dims, t, t + 1)
            token.pop(state_key, None)
            out_t, state = step_fn(token, state)
            outs.append(out_t)
    errors = {"out": rel_err(torch.cat(outs, dim=1), full_out), "final_state": rel_err(state, full_state)}
    assert_close(errors, tol, what or "step")
    return errors
