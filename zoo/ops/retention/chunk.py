"""Chunkwise retention in PyTorch: the CPU fast path and the fallback everywhere.

The chunkwise recurrent form of RetNet (Sun et al. 2023, arXiv:2307.08621, section 2.2 "chunkwise recurrent
representation"), with the data-dependent scalar gates of gated linear attention (Yang et al. 2023,
arXiv:2312.06635, section 3). The sequence is cut into chunks of C tokens; inside a chunk the parallel form
runs as dense (C, C) matmuls, and a (Dk, Dv) state per head carries everything earlier from chunk to chunk:

    o_chunk = scale * [ ((Q K^T) * D) V  +  (Q * exp(b)) S_prev ]
    S_next  = exp(b_C) S_prev + (K * exp(b_C - b))^T V

with b the cumulative log-gate *within* the chunk (b_C its last entry) and D_ij = exp(b_i - b_j) for i >= j.
Every exponent is a difference b_i - b_j with i >= j, or b_i, or b_C - b_j, so it is <= 0 for gates <= 0:
nothing overflows, and a strongly decaying head underflows harmlessly to 0 instead of producing inf * 0 = nan.

Memory is O(T * C + T / C * Dk * Dv): linear in T. Autograd differentiates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.ops.retention.naive import per_sequence, state_dtype


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise retention. q, k (B, T, H, Dk); v (B, T, H, Dv); g (B, T, H) log-gates; state (B, H, Dk, Dv).

    Packed sequences (``cu_seqlens``) are run one sequence at a time.
    """
    if cu_seqlens is not None:
        args = (q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
        return per_sequence(chunk_retention, *args, chunk_size=chunk_size)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)  # number of chunks
    pad = N * C - T
    acc = state_dtype(q.dtype)

    # Pad the tail to whole chunks: k = 0 adds nothing to the state and g = 0 does not decay it, so the padded
    # positions leave the final state untouched; their outputs are cut off at the end.
    def chunked(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B, H, N, C, D)
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunked(q), chunked(k), chunked(v)
    b = chunked(g[..., None])[..., 0].cumsum(-1)  # (B, H, N, C) log-decay from chunk start, inclusive
    b_last = b[..., -1]  # (B, H, N) log-decay across the whole chunk

    # 1. intra-chunk: the parallel form on each (C, C) block
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    D = torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")).exp()  # (B, H, N, C, C)
    out = ((qc @ kc.transpose(-1, -2)) * D) @ vc  # (B, H, N, C, Dv)

    # 2. each chunk's own contribution to the state at its end, decayed to that end
    k_to_end = kc * (b_last[..., None] - b).exp()[..., None]  # (B, H, N, C, Dk)
    U = k_to_end.transpose(-1, -2) @ vc  # (B, H, N, Dk, Dv)

    # 3. carry the state across chunks: the only sequential step, N iterations of a (Dk, Dv) update
    S = qc.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(acc)
    starts = []
    # Unbind once: indexing U[:, :, n] inside the loop would make autograd allocate a full-size gradient of U
    # per chunk in the backward, quadratic in T.
    chunk_updates = U.unbind(2)
    chunk_decays = b_last.exp()[..., None, None].unbind(2)
    for n in range(N):
        starts.append(S)
        S = chunk_decays[n] * S + chunk_updates[n]
    if N > 0:
        S_prev = torch.stack(starts, dim=2)  # (B, H, N, Dk, Dv) state entering each chunk
        # 4. inter-chunk: what the state entering the chunk contributes, decayed to each position
        out = out + (qc * b.exp()[..., None]) @ S_prev

    out = (scale * out).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T]  # (B, T, H, Dv)
    return out.to(q.dtype), S if output_final_state else None
