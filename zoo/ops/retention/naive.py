"""Retention as the papers write it: the oracle every faster form is tested against.

Retention (RetNet, Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models",
arXiv:2307.08621) with a fixed per-head decay gamma, and its gated form with a data-dependent scalar decay per
head and token (gated linear attention, Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv:2312.06635). Both are the same recurrence once the decay is written as
per-token log-gates g_t:

    S_t = exp(g_t) S_{t-1} + k_t^T v_t          (state, Dk x Dv per head)
    o_t = scale * q_t S_t

Two readable forms live here: the recurrent form (a loop over t, eq. 1 of RetNet) and the parallel form
(o = ((Q K^T) * D) V with the decay mask D_ij = exp(G_i - G_j) for i >= j, G the cumulative log-gate; eq. 5).
They are short, run in float64, and are slow on purpose. Callers pass per-token gates g [B, T, H]; the public
``zoo.ops.retention.retention`` expands a fixed per-head decay [H] to that shape before it gets here. Grouped q and
k ([B, T, G, Dk], G dividing H, shared by H / G heads each, as Mamba-2's B and C: Dao & Gu 2024, arXiv:2405.21060)
are repeated to the H heads here (``expand_groups``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states are kept and accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(q: torch.Tensor, k: torch.Tensor, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped q, k (B, T, G, Dk) repeated to the H heads of v, head h reading group h // (H / G) (a copy: the
    oracle spells the sharing out; the chunked forms compute each group's scores once)."""
    G = q.shape[2]
    if G == H:
        return q, k
    return q.repeat_interleave(H // G, dim=2), k.repeat_interleave(H // G, dim=2)


def per_sequence(
    fn: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``fn`` on each sequence packed in a ``cu_seqlens`` batch (B == 1); stitch the results together.

    The slow but obviously-correct way to honour sequence boundaries: no state can cross one because every
    sequence is a separate call, starting from its own row of ``initial_state``.
    """
    bounds = cu_seqlens.tolist()
    results = []
    for n in range(len(bounds) - 1):
        bos, eos = bounds[n], bounds[n + 1]
        h0 = None if initial_state is None else initial_state[n : n + 1]  # (1, H, Dk, Dv)
        q_n, k_n, v_n, g_n = (x[:, bos:eos] for x in (q, k, v, g))  # (1, T_n, H, ...)
        results.append(fn(q_n, k_n, v_n, g_n, scale, h0, output_final_state, **kwargs))
    out = torch.cat([r[0] for r in results], dim=1)  # (1, T, H, Dv)
    state = torch.cat([r[1] for r in results], dim=0) if output_final_state else None
    if len(results[0]) == 3:  # with row sums (B, T, H)
        return out, state, torch.cat([r[2] for r in results], dim=1)
    return out, state


def with_row_sum(
    fn: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Retention plus its row sums, by a second call of ``fn`` on a value of ones (without gradient).

    The row sums r_n = scale * sum_m (q_n . k_m) exp(G_n - G_m) are the output for v = 1; their state is the
    decayed key sum, carried as one more, last column of the state ([N, H, Dk, Dv + 1]). Backends without a
    fused row sum use this.
    """
    Dv = v.shape[-1]
    kv_state = initial_state[..., :Dv] if initial_state is not None else None
    out, state = fn(q, k, v, g, scale, kv_state, output_final_state, cu_seqlens, **kwargs)
    with torch.no_grad():
        ones = v.new_ones(*v.shape[:-1], 1)
        key_sum = initial_state[..., Dv:] if initial_state is not None else None
        sums, z = fn(q, k, ones, g, scale, key_sum, output_final_state, cu_seqlens, **kwargs)
    if output_final_state:
        state = torch.cat([state, z.to(state.dtype)], dim=-1)
    return out, state, sums[..., 0]


def naive_recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence, one token at a time. q, k (B, T, H, Dk) or grouped (B, T, G, Dk); v (B, T, H, Dv); g (B, T, H)
    log-gates."""
    q, k = expand_groups(q, k, v.shape[2])
    if cu_seqlens is not None:
        return per_sequence(
            naive_recurrent_retention, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens
        )
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    qf, kf, vf, gf = (x.to(acc) for x in (q, k, v, g))
    if initial_state is None:
        S = qf.new_zeros(B, H, Dk, Dv)
    else:
        S = initial_state.to(acc)  # (B, H, Dk, Dv)
    outs = []
    for t in range(T):
        S = gf[:, t, :, None, None].exp() * S + kf[:, t, :, :, None] * vf[:, t, :, None, :]  # (B, H, Dk, Dv)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, t], S))  # (B, H, Dv)
    out = torch.stack(outs, dim=1) if T > 0 else vf.new_zeros(B, 0, H, Dv)  # (B, T, H, Dv)
    return out.to(q.dtype), S if output_final_state else None


def naive_parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parallel form with a dense (T, T) decay mask, O(T^2) memory; arguments as the recurrent form."""
    q, k = expand_groups(q, k, v.shape[2])
    if cu_seqlens is not None:
        return per_sequence(
            naive_parallel_retention, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens
        )
    T = q.shape[1]
    acc = state_dtype(q.dtype)
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    G = g.to(acc).transpose(1, 2).cumsum(-1)  # (B, H, T) cumulative log-decay
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    # Mask before exp: G_i - G_j is positive (and may be huge) above the diagonal.
    D = torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")).exp()  # (B, H, T, T)
    out = scale * ((qf @ kf.transpose(-1, -2)) * D) @ vf  # (B, H, T, Dv)
    G_end = G.sum(-1) if T == 0 else G[..., -1]  # (B, H); zero for an empty sequence
    decay_to_end = (G_end[..., None] - G).exp()  # (B, H, T)
    S = (kf * decay_to_end[..., None]).transpose(-1, -2) @ vf  # (B, H, Dk, Dv)
    if initial_state is not None:
        h0 = initial_state.to(acc)  # (B, H, Dk, Dv)
        out = out + scale * G.exp()[..., None] * (qf @ h0)
        S = S + G_end.exp()[..., None, None] * h0
    return out.transpose(1, 2).to(q.dtype), S if output_final_state else None
