"""The long causal convolution, written out: the oracle every faster form is tested against.

Hyena (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models", arXiv:2302.10866,
section 3) filters every channel c of a length-T input u with its own filter h[c] as long as the sequence, plus a
skip term:

    y_t[c] = sum_{s <= t} h[c, t - s] u_s[c] + D[c] u_t[c]

A filter shorter than the sequence (L < T) reaches back L - 1 steps only. Inputs before the first token come from
``initial_state``, the inputs just before it (most recent last); zeros, which add nothing, by default.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sums run in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def last_inputs(history: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` steps of ``history`` (batch, C, S), zeros in front where S < n: the state a filter of length
    n + 1 needs."""
    S = history.shape[-1]
    if S >= n:
        return history[..., S - n :]
    return torch.cat([history.new_zeros(*history.shape[:-1], n - S), history], dim=-1)


def naive_long_conv(
    u: torch.Tensor,
    h: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sum over taps, one token at a time. u (batch, T, C); h (C, L); D (C,); initial_state (batch, C, S),
    one row per packed sequence with ``cu_seqlens`` (each sequence a separate call). The final state is the last
    L - 1 inputs, (batch, C, L - 1)."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(len(bounds) - 1):
            h0 = None if initial_state is None else initial_state[n : n + 1]
            y_n, s_n = naive_long_conv(u[:, bounds[n] : bounds[n + 1]], h, D, h0, output_final_state)
            outs.append(y_n)
            states.append(s_n)
        return torch.cat(outs, dim=1), torch.cat(states) if output_final_state else None
    batch, T, C = u.shape
    L = h.shape[1]
    acc = compute_dtype(u.dtype)
    past = u.new_zeros(batch, C, 0, dtype=acc) if initial_state is None else initial_state.to(acc)
    history = torch.cat([past, u.to(acc).transpose(1, 2)], dim=2)  # (batch, C, S + T), oldest first
    S = past.shape[2]
    hh = h.to(acc)
    ys = []
    for t in range(T):
        now = S + t
        y_t = u.new_zeros(batch, C, dtype=acc)
        for j in range(min(L, now + 1)):  # tap j meets the input j steps back
            y_t = y_t + hh[:, j] * history[:, :, now - j]
        if D is not None:
            y_t = y_t + D.to(acc) * history[:, :, now]
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, C, dtype=acc)
    final = last_inputs(history, L - 1).to(u.dtype) if output_final_state else None
    return y.to(u.dtype), final
