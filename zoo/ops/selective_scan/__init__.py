"""Selective scan: the selective state-space recurrence of Mamba-1, per channel and state.

Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752,
Algorithm 2). Every channel d has N states, decayed and written per token through its own step size dt:

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] x_t[d]           then  y_t[d] *= silu(z_t[d])  if z is given

with dt <- softplus(dt + dt_bias) when ``dt_softplus`` (mamba_ssm's ``selective_scan_fn(u, delta, A, B, C, D, z,
delta_bias, delta_softplus)``, here batch-first). Backends (see ``zoo.ops.dispatch``): ``naive`` (the loop over
time, the oracle), ``torch`` (a chunked scan with a hand-written backward) and ``triton`` (Triton kernels: a forward in
one pass over time holding the states in registers, a backward recomputing the states chunk by chunk).

    y, final_state = selective_scan(x, dt, A, B, C, D, z, dt_softplus=True, output_final_state=True)
    y_t, state = selective_scan_step(x_t, dt_t, A, B_t, C_t, D, z_t, state, dt_softplus=True)   # O(1) decoding
"""

from __future__ import annotations

import torch

from zoo.ops.dispatch import resolve_backend
from zoo.ops.selective_scan import chunk, naive

__all__ = ["selective_scan", "selective_scan_step"]


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"selective_scan: {name} has shape {tuple(got.shape)}, expected {expected}")


def _check_floating(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"selective_scan: {name} has dtype {t.dtype}, expected a floating dtype")


def _check_parameters(A, D, dt_bias, Dc: int) -> int:
    """Check A (Dc, N), D (Dc,), dt_bias (Dc,); return N."""
    if A.dim() != 2 or A.shape[0] != Dc:
        raise _shape_error("A", A, f"[Dc, N] with Dc={Dc} (real, negative)")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (Dc,):
            raise _shape_error(name, t, f"[Dc]=[{Dc}]")
    return A.shape[1]


def _check_BC(B, C, lead: tuple[int, ...], Dc: int, N: int) -> None:
    """B and C: lead + (N,), or grouped lead + (G, N) with Dc divisible by G; both the same shape."""
    if B.dim() == len(lead) + 1:
        ok = tuple(B.shape) == (*lead, N)
    else:
        ok = B.dim() == len(lead) + 2 and tuple(B.shape[: len(lead)]) == lead and B.shape[-1] == N
        ok = ok and B.shape[-2] > 0 and Dc % B.shape[-2] == 0
    if not ok:
        expected = (
            f"[{', '.join(map(str, lead))}, N] or grouped [..., G, N] with N={N} and Dc={Dc} divisible by G"
        )
        raise _shape_error("B", B, expected)
    if tuple(C.shape) != tuple(B.shape):
        raise _shape_error("C", C, f"the shape of B, {list(B.shape)}")


def _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens) -> int:
    """Check a full call; return the number of sequences (rows of the state)."""
    if x.dim() != 3:
        raise _shape_error("x", x, "[B, T, Dc]")
    batch, T, Dc = x.shape
    _check_floating(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    for name, t in (("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, T, Dc):
            raise _shape_error(name, t, f"the shape of x, [B, T, Dc]={list(x.shape)}")
    N = _check_parameters(A, D, dt_bias, Dc)
    _check_BC(B, C, (batch, T), Dc, N)
    rows = batch
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error("cu_seqlens", cu_seqlens, "[N_seq + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"selective_scan: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32"
            )
        if batch != 1:
            raise _shape_error("x", x, f"B == 1 when cu_seqlens is given (packed sequences), got B={batch}")
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T:
            raise ValueError(
                f"selective_scan: cu_seqlens runs from {first} to {last}, expected from 0 to T={T}"
            )
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"selective_scan: cu_seqlens={cu_seqlens.tolist()} decreases, expected non-decreasing"
            )
        rows = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (rows, Dc, N):
        what = "[N_seq, Dc, N]" if cu_seqlens is not None else "[B, Dc, N]"
        raise _shape_error("initial_state", initial_state, f"{what}={[rows, Dc, N]}")
    return rows


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan over whole sequences.

    Args:
        x: [B, T, Dc] the input of every channel. dt: [B, T, Dc] step sizes (raw, before ``dt_bias`` and
            softplus). z: [B, T, Dc] gate, y *= silu(z).
        A: [Dc, N], real and negative (Mamba: -exp(A_log)). D: [Dc] skip connection. dt_bias: [Dc].
        B, C: [B, T, N] shared by all channels, or grouped [B, T, G, N] (Dc divisible by G; channel d reads
            group d // (Dc // G)).
        dt_softplus: dt <- softplus(dt + dt_bias).
        initial_state: [B, Dc, N], the state before the first token ([N_seq, Dc, N] with ``cu_seqlens``).
        output_final_state: also return the state after the last token, float32 (float64 for float64 x).
        cu_seqlens: LongTensor [N_seq + 1] of cumulative lengths of sequences packed along T, with B == 1. No
            state crosses a boundary.
        chunk_size: tokens per chunk of the ``torch`` backend (and of the states the ``triton`` forward keeps for
            its backward).
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.

    Returns:
        (y [B, T, Dc] in the dtype of x, final_state or None).
    """
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size={chunk_size}, expected a positive integer")
    name = resolve_backend("selective_scan", backend, x.device)
    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, output_final_state, cu_seqlens)
    if name == "naive":
        return naive.naive_selective_scan(*args)
    if name == "triton":
        # imported here so that zoo imports without triton, and triton is only imported when asked for
        from zoo.ops.selective_scan import triton as triton_impl

        return triton_impl.triton_selective_scan(*args, chunk_size=chunk_size)
    return chunk.chunk_selective_scan(*args, chunk_size=chunk_size)


def selective_scan_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, O(1) in the context length.

    Args:
        x, dt, z: [B, Dc] (or [B, 1, Dc]). A: [Dc, N]. B, C: [B, N] or grouped [B, G, N] (or [B, 1, N] /
            [B, 1, G, N] with the time axis, when x has it). D, dt_bias: [Dc].
        state: [B, Dc, N], as returned by ``selective_scan(..., output_final_state=True)`` or a previous step;
            None starts from zeros.

    Returns:
        (y in the layout and dtype of x, new_state [B, Dc, N] in the dtype of ``state``, float32 or float64 when
        it starts from None).
    """
    with_time = x.dim() == 3
    if with_time:
        if x.shape[1] != 1:
            raise _shape_error("x", x, "[B, Dc] or [B, 1, Dc] (one token)")
        x, dt, z, B, C = (t if t is None or t.dim() < 2 else t[:, 0] for t in (x, dt, z, B, C))
    if x.dim() != 2:
        raise _shape_error("x", x, "[B, Dc] or [B, 1, Dc] (one token)")
    batch, Dc = x.shape
    _check_floating(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, state=state)
    for name, t in (("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, Dc):
            raise _shape_error(name, t, f"the shape of x, [B, Dc]={[batch, Dc]}")
    N = _check_parameters(A, D, dt_bias, Dc)
    _check_BC(B, C, (batch,), Dc, N)
    if state is not None and tuple(state.shape) != (batch, Dc, N):
        raise _shape_error("state", state, f"[B, Dc, N]={[batch, Dc, N]}")
    acc = naive.state_dtype(x.dtype) if state is None else state.dtype
    h = x.new_zeros(batch, Dc, N, dtype=acc) if state is None else state
    grouped = B.dim() == 3
    x_, dt_, z_, A_, D_, bias = (None if t is None else t.to(acc) for t in (x, dt, z, A, D, dt_bias))
    B_, C_ = (naive.expand_groups(t.to(acc), Dc, grouped) for t in (B, C))  # (B, Dc, N)
    y, h = naive.step(x_, naive.discretise(dt_, bias, dt_softplus), A_, B_, C_, D_, z_, h)
    y = y.to(x.dtype)
    return (y[:, None] if with_time else y), h
