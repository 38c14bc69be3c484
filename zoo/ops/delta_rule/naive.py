"""The generalised delta rule as the paper writes it: the oracle every faster form is tested against.

RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution", arXiv:2503.14456,
eq. 17-18) evolves a matrix state with a diagonal-plus-rank-one transition per token and head:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T          S_t: (Dv x Dk), w_t = exp(g_t)
    o_t = scale * S_t q_t

This file keeps the paper's orientation, S as (Dv, Dk), and one loop over time: short, slow on purpose, and in
float64 when given float64. The public op's states are (Dk, Dv), the transpose (as the other ops of ``zoo.ops``
and fla store them), so the state is transposed on the way in and out here.
"""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states are kept and accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence, one token at a time. q, k, a, b, g (B, T, H, Dk); v (B, T, H, Dv); state (N, H, Dk, Dv).

    With ``cu_seqlens`` (B == 1) every packed sequence is a separate call from its own row of ``initial_state``.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(len(bounds) - 1):
            piece = [x[:, bounds[n] : bounds[n + 1]] for x in (q, k, v, a, b, g)]
            h0 = None if initial_state is None else initial_state[n : n + 1]
            out, state = naive_dplr_delta_rule(*piece, scale, h0, output_final_state)
            outs.append(out)
            states.append(state)
        return torch.cat(outs, dim=1), torch.cat(states) if output_final_state else None
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc, out_dtype = state_dtype(q.dtype), v.dtype
    q, k, v, a, b, g = (x.to(acc) for x in (q, k, v, a, b, g))
    if initial_state is None:
        S = q.new_zeros(B, H, Dv, Dk)
    else:
        S = initial_state.to(acc).transpose(-1, -2)  # (B, H, Dv, Dk), the paper's orientation
    outs = []
    # unbound once: indexing x[:, t] T times would cost a full-size gradient per token in the backward
    for q_t, k_t, v_t, a_t, b_t, g_t in zip(*(x.unbind(1) for x in (q, k, v, a, b, g))):
        transition = torch.diag_embed(g_t.exp()) + a_t[..., :, None] * b_t[..., None, :]  # (B, H, Dk, Dk)
        S = S @ transition + v_t[..., :, None] * k_t[..., None, :]  # (B, H, Dv, Dk)
        outs.append(scale * (S @ q_t[..., None])[..., 0])  # (B, H, Dv)
    out = torch.stack(outs, dim=1) if T > 0 else v.new_zeros(B, 0, H, Dv)  # (B, T, H, Dv)
    final = S.transpose(-1, -2) if output_final_state else None  # (B, H, Dk, Dv)
    return out.to(out_dtype), final
