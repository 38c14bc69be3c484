"""Infini-attention's compressive memory as the paper writes it: the oracle every faster form is tested against.

Munkhdalai et al. 2024, "Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention",
arXiv:2404.07143, section 2.1.2. The sequence is cut into segments of L tokens; per head a memory M (Dk x Dv) and a
normaliser z (Dk) are read by every token of a segment and written once the segment is over:

    read   A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1} + eps)                                  (eq. 3)
    linear M_s = M_{s-1} + σ(K)^T V                                                      (eq. 4)
    delta  M_s = M_{s-1} + σ(K)^T (V - σ(K) M_{s-1} / (σ(K) z_{s-1} + eps))              (eq. 5)
           z_s = z_{s-1} + sum_t σ(K_t)

with σ = ELU + 1 and Q, K, V the segment's rows. ``eps`` only matters where z is zero (before the first write),
where M is zero as well: the read is then exactly zero, as the paper's empty memory implies.

One loop over segments, in float64 when given float64: short and slow on purpose. The state is (M, z) as one
tensor, z the last column: [N, H, Dk, Dv + 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states are kept and accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """σ(x) = ELU(x) + 1: positive, as the normaliser z needs."""
    return F.elu(x) + 1


def naive_compressive_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_length: int,
    update: str,
    eps: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The memory read of every token and the state after the last segment. q, k (B, T, H, Dk); v (B, T, H, Dv).

    With ``cu_seqlens`` (B == 1) every packed sequence is a separate call from its own row of ``initial_state``.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(len(bounds) - 1):
            piece = [x[:, bounds[n] : bounds[n + 1]] for x in (q, k, v)]
            h0 = None if initial_state is None else initial_state[n : n + 1]
            out, state = naive_compressive_memory(*piece, segment_length, update, eps, h0, output_final_state)
            outs.append(out)
            states.append(state)
        return torch.cat(outs, dim=1), torch.cat(states) if output_final_state else None
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    sq, sk, v_ = feature_map(q.to(acc)), feature_map(k.to(acc)), v.to(acc)
    if initial_state is None:
        M = sq.new_zeros(B, H, Dk, Dv)
        z = sq.new_zeros(B, H, Dk)
    else:
        M, z = initial_state[..., :Dv].to(acc), initial_state[..., Dv].to(acc)
    outs = []
    for start in range(0, T, segment_length):
        seg = slice(start, start + segment_length)
        sq_s, sk_s, v_s = sq[:, seg], sk[:, seg], v_[:, seg]  # (B, L, H, D)
        # read the memory of the previous segments only
        numerator = torch.einsum("blhk,bhkv->blhv", sq_s, M)
        denominator = torch.einsum("blhk,bhk->blh", sq_s, z) + eps
        outs.append(numerator / denominator[..., None])
        # then write this segment
        if update == "delta":
            retrieved = torch.einsum("blhk,bhkv->blhv", sk_s, M)
            retrieved = retrieved / (torch.einsum("blhk,bhk->blh", sk_s, z) + eps)[..., None]
            M = M + torch.einsum("blhk,blhv->bhkv", sk_s, v_s - retrieved)
        else:
            M = M + torch.einsum("blhk,blhv->bhkv", sk_s, v_s)
        z = z + sk_s.sum(1)
    out = torch.cat(outs, dim=1) if outs else v_.new_zeros(B, 0, H, Dv)
    final = torch.cat([M, z[..., None]], dim=-1) if output_final_state else None
    return out.to(v.dtype), final
