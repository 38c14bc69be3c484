"""The selective scan as the paper writes it: the oracle every faster form is tested against.

Mamba's selective state-space model (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv:2312.00752, Algorithm 2 with the zero-order-hold A and the Euler B of section 3.5): each channel d
carries N states, discretised per token by its own step dt_t[d]:

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] x_t[d]             then y_t[d] *= silu(z_t[d]) if z is given

with dt = softplus(dt + dt_bias) when ``dt_softplus`` (dt_bias is added either way), as in mamba_ssm's
``selective_scan_ref``. B and C are shared by all channels, or by the channels of a group (grouped B/C, [..., G, N]:
channel d reads group d // (Dc // G)). ``selective_scan_step`` is one token of it; ``naive_selective_scan`` is that
step in a loop over time. Short, runs in float64, slow on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states are kept and accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(BC: torch.Tensor, Dc: int, grouped: bool) -> torch.Tensor:
    """B or C read by every channel: [..., N] -> [..., Dc, N], or grouped [..., G, N] -> [..., Dc, N]."""
    if not grouped:
        return BC.unsqueeze(-2).expand(*BC.shape[:-1], Dc, BC.shape[-1])
    G = BC.shape[-2]
    return BC.repeat_interleave(Dc // G, dim=-2)


def step(x, dt, A, B, C, D, z, h):
    """One token of the recurrence, every input already in the state dtype, dt already discretised.

    x, dt, z: (batch, Dc). A: (Dc, N). B, C: (batch, Dc, N), one row per channel. D: (Dc,). h: (batch, Dc, N).
    Returns (y (batch, Dc), new h).
    """
    h = torch.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B  # (batch, Dc, N)
    y = (h * C).sum(-1)  # (batch, Dc)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z)
    return y, h


def discretise(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    """The step sizes: dt + dt_bias, through softplus when ``dt_softplus`` (mamba_ssm's ``delta_softplus``)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    return F.softplus(dt) if dt_softplus else dt


def naive_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence, one token at a time. x, dt, z (batch, T, Dc); A (Dc, N); B, C (batch, T, N) or
    (batch, T, G, N); D, dt_bias (Dc,); states (batch, Dc, N), or one per packed sequence with ``cu_seqlens``."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(len(bounds) - 1):
            bos, eos = bounds[n], bounds[n + 1]
            h0 = None if initial_state is None else initial_state[n : n + 1]
            seq = (t if t is None else t[:, bos:eos] for t in (x, dt, B, C, z))
            x_n, dt_n, B_n, C_n, z_n = seq
            y_n, h_n = naive_selective_scan(
                x_n, dt_n, A, B_n, C_n, D, z_n, dt_bias, dt_softplus, h0, output_final_state
            )
            outs.append(y_n)
            states.append(h_n)
        return torch.cat(outs, dim=1), torch.cat(states) if output_final_state else None
    batch, T, Dc = x.shape
    acc = state_dtype(x.dtype)
    grouped = B.dim() == 4
    A_, D_, bias = (None if t is None else t.to(acc) for t in (A, D, dt_bias))
    dt_ = discretise(dt.to(acc), bias, dt_softplus)
    # one view per token (unbind: its backward is one stack, not a full-size zero tensor per token)
    xs, dts, Bs, Cs = (t.to(acc).unbind(1) for t in (x, dt_, B, C))
    zs = [None] * T if z is None else z.to(acc).unbind(1)
    h = x.new_zeros(batch, Dc, A.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(T):
        B_t, C_t = (expand_groups(v, Dc, grouped) for v in (Bs[t], Cs[t]))  # (batch, Dc, N)
        y_t, h = step(xs[t], dts[t], A_, B_t, C_t, D_, zs[t], h)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if T > 0 else x.new_zeros(batch, 0, Dc, dtype=acc)  # (batch, T, Dc)
    return y.to(x.dtype), h if output_final_state else None
