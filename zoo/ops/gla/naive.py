"""Vector-decay linear attention as the papers write it: the oracle every faster form is tested against.

Gated linear attention (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training",
arXiv:2312.06635, eq. 3) decays every key channel of the state by its own per-token gate:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T            o_t = scale * q_t^T S_t

RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
arXiv:2404.05892, eq. 19-20) is the same recurrence read one token earlier, with a bonus u for the current token:

    o_t = scale * q_t^T (S_{t-1} + diag(u) k_t v_t^T)

(its receptance r is q here, its decay w = exp(g)). g is the log of the decay, <= 0. The recurrent loop below is
short, runs in float64 and is slow on purpose.
"""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states are kept and accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def step(q, k, v, g, u, scale: float, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token, all in the state dtype: q, k, g (B, H, K); v (B, H, V); u (H, K) or None; state (B, H, K, V).

    Returns (o (B, H, V), new state)."""
    kv = k[..., :, None] * v[..., None, :]  # (B, H, K, V)
    new_state = torch.exp(g)[..., None] * state + kv
    read = new_state if u is None else state + u[..., None] * kv
    return scale * torch.einsum("bhk,bhkv->bhv", q, read), new_state


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence, one token at a time. q, k, g (B, T, H, K); v (B, T, H, V); u (H, K) or None; states
    (B, H, K, V), or one per packed sequence with ``cu_seqlens`` (B == 1)."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(len(bounds) - 1):
            h0 = None if initial_state is None else initial_state[n : n + 1]
            seq = slice(bounds[n], bounds[n + 1])
            out, state = naive_recurrent_gla(q[:, seq], k[:, seq], v[:, seq], g[:, seq], u, scale, h0, True)
            outs.append(out)
            states.append(state)
        return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = state_dtype(q.dtype)
    state = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    u = None if u is None else u.to(acc)
    outs = []
    # unbound once: indexing x[:, t] in the loop would make its backward O(T^2)
    for token in zip(*(x.to(acc).unbind(1) for x in (q, k, v, g))):
        o, state = step(*token, u, scale, state)
        outs.append(o)
    out = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V, dtype=acc)
    return out.to(v.dtype), (state if output_final_state else None)
