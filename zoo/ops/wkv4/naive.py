"""RWKV-4's WKV as the paper writes it, in its max-tracking form: the oracle every faster form is tested against.

RWKV (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048, eq. 14 and its
recurrent form in appendix D). Per channel, with a time decay w < 0 (the model passes w = -exp(time_decay)) and a
bonus u for the current token (time_first):

    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i) w + k_i} + e^{u + k_t})

computed as a recurrence over a state (num, den, max) holding the numerator and denominator of the sum over past
tokens divided by e^max, so that no exponent is ever positive (transformers' ``rwkv_linear_attention_cpu`` keeps
the same three numbers):

    m   = max(max_{t-1}, u + k_t)
    wkv_t = (e^{max_{t-1} - m} num_{t-1} + e^{u + k_t - m} v_t) / (e^{max_{t-1} - m} den_{t-1} + e^{u + k_t - m})
    max_t = max(max_{t-1} + w, k_t)
    num_t = e^{max_{t-1} + w - max_t} num_{t-1} + e^{k_t - max_t} v_t       (den_t alike, with 1 for v_t)

The state is one tensor [N, 3, C]: ``state[:, 0]`` the numerator, ``state[:, 1]`` the denominator, ``state[:, 2]``
the max (transformers' list ``[num, den, max]`` is ``state.unbind(1)``; ``torch.stack(list, 1)`` goes back). The
empty state is (0, 0, -1e38), as transformers starts it.
"""

from __future__ import annotations

import torch

# the max of the empty state: transformers' value, far below any exponent, and finite so that gradients stay finite
EMPTY_MAX = -1e38


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states are kept and accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_state(rows: int, C: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The state before any token, (rows, 3, C): numerator 0, denominator 0, max -1e38."""
    state = torch.zeros(rows, 3, C, dtype=dtype, device=device)
    state[:, 2] = EMPTY_MAX
    return state


def step(w, u, k, v, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: k, v (B, C); w, u (C,); state (B, 3, C); all in the state dtype. Returns (wkv (B, C), state)."""
    num, den, mx = state.unbind(1)
    m = torch.maximum(mx, u + k)
    e1, e2 = torch.exp(mx - m), torch.exp(u + k - m)
    out = (e1 * num + e2 * v) / (e1 * den + e2)
    new_max = torch.maximum(mx + w, k)
    e1, e2 = torch.exp(mx + w - new_max), torch.exp(k - new_max)
    new_state = torch.stack([e1 * num + e2 * v, e1 * den + e2, new_max], dim=1)
    return out, new_state


def naive_wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence, one token at a time. k, v (B, T, C); w, u (C,); states (B, 3, C), or one per packed
    sequence with ``cu_seqlens`` (B == 1)."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(len(bounds) - 1):
            h0 = None if initial_state is None else initial_state[n : n + 1]
            seq = slice(bounds[n], bounds[n + 1])
            out, state = naive_wkv4(w, u, k[:, seq], v[:, seq], h0, True)
            outs.append(out)
            states.append(state)
        return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)
    B, T, C = k.shape
    acc = state_dtype(k.dtype)
    state = empty_state(B, C, acc, k.device) if initial_state is None else initial_state.to(acc)
    w, u = w.to(acc), u.to(acc)
    outs = []
    # unbound once: indexing k[:, t] in the loop would make its backward O(T^2)
    for k_t, v_t in zip(k.to(acc).unbind(1), v.to(acc).unbind(1)):
        out, state = step(w, u, k_t, v_t, state)
        outs.append(out)
    out = torch.stack(outs, 1) if outs else k.new_zeros(B, 0, C, dtype=acc)
    return out.to(v.dtype), (state if output_final_state else None)
