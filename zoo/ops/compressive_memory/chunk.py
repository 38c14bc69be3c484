"""Infini-attention's compressive memory, all segments at once in PyTorch: the CPU fast path and the fallback.

Munkhdalai et al. 2024, "Leave No Context Behind", arXiv:2404.07143 (see ``naive.py`` for the equations). Every
segment of every sequence is gathered into one (segments, L) layout, so that what does not depend on the memory is
one batched matmul over all segments at once:

    U_s = σ(K_s)^T [V_s | 1]                                   (Dk x (Dv + 1): the segment's write, z included)
    W_s = σ(K_s)^T diag(1 / (σ(K_s) z_{s-1} + eps)) σ(K_s)     (Dk x Dk, delta rule only)

The memory entering each segment then follows per sequence:

    linear  M_{s-1} = M_0 + sum_{r < s} U_r          an exclusive cumulative sum over segments
    delta   M_s = M_{s-1} - W_s M_{s-1} + U_s        one (Dk x Dk)(Dk x Dv) matmul per segment, in sequence

(z is the same cumulative sum under both rules, and is computed first: the delta rule's W_s needs z_{s-1}.) The
reads σ(Q_s) M_{s-1} / (σ(Q_s) z_{s-1} + eps) are again one batched matmul. Memory: one (Dk x (Dv + 1)) state per
segment and head, Dk (Dv + 1) / L numbers per token, kept for the backward, which is autograd's.

Why the linear rule is not a call of ``zoo.ops.retention`` (the same recurrence without decay): retention's
token ``t`` reads a state that includes ``t`` itself, where the memory read must see the previous segments only,
and exactly nothing before the first write (the read divides by σ(q) z). Getting it from retention would subtract
the current segment's contribution from an inclusive read, a cancellation that leaves rounding noise where the
memory is empty, which the division then amplifies. Between segments the two recurrences are the same cumulative
sum, done here directly.

Packed sequences (``cu_seqlens``) are the general case: a batch of B rows is B packed sequences of T tokens.
Segments restart at the start of every sequence, and no state crosses from one sequence to the next.
"""

from __future__ import annotations

import torch

from zoo.ops.compressive_memory.naive import feature_map, state_dtype


def segment_layout(lengths: torch.Tensor, segment_length: int):
    """Where the tokens of sequences of ``lengths`` (N,) go in a (segments, L) layout.

    Returns ``index`` (S, L) of each slot's token in the packed sequence (clamped, valid or not), ``valid`` (S, L),
    ``seg_seq`` (S,) the sequence of each segment, ``seg_pos`` (S,) its place in that sequence, ``counts`` (N,)
    segments per sequence.
    """
    L = segment_length
    device = lengths.device
    offsets = torch.cumsum(lengths, 0) - lengths  # (N,)
    counts = (lengths + L - 1) // L  # (N,)
    seg_seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)  # (S,)
    first_seg = torch.cumsum(counts, 0) - counts
    seg_pos = torch.arange(len(seg_seq), device=device) - first_seg[seg_seq]
    start = offsets[seg_seq] + seg_pos * L  # (S,)
    index = start[:, None] + torch.arange(L, device=device)  # (S, L)
    valid = index < (offsets + lengths)[seg_seq][:, None]
    total = int(lengths.sum())
    return index.clamp(max=max(total - 1, 0)), valid, seg_seq, seg_pos, counts


def _exclusive_cumsum(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``start`` + the sum of x over the earlier entries of axis 1 (no subtraction: exact where nothing came)."""
    before = torch.cumsum(x[:, :-1], dim=1)
    return torch.cat([start[:, None], start[:, None] + before], dim=1)


@torch.compiler.disable
def chunk_compressive_memory(*args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All segments at once (arguments as ``_chunk_compressive_memory``), in the accumulation dtype whatever
    autocast would pick, and eagerly inside a ``torch.compile``d model (the layout depends on the lengths, and the
    delta rule loops over segments)."""
    with torch.autocast(args[0].device.type, enabled=False):
        return _chunk_compressive_memory(*args)


def _chunk_compressive_memory(
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
    """q, k (B, T, H, Dk); v (B, T, H, Dv); states (N, H, Dk, Dv + 1), z the last column."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    if cu_seqlens is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=q.device)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    N = len(lengths)
    index, valid, seg_seq, seg_pos, counts = segment_layout(lengths, segment_length)
    S, L = index.shape

    def gather(x):  # (B, T, H, D) -> (S, L, H, D), zero where no token
        flat = x.reshape(B * T, H, x.shape[-1]).to(acc)
        if B * T == 0:
            return flat.new_zeros(S, L, H, x.shape[-1])
        return flat[index] * valid[..., None, None]

    sq = feature_map(gather(q))
    sk = feature_map(gather(k)) * valid[..., None, None]  # σ(0) = 1: padding slots must write nothing
    vv = gather(v)
    vz = torch.cat([vv, valid[..., None, None].to(acc).expand(S, L, H, 1)], dim=-1)  # [V | 1]: writes M and z

    if initial_state is None:
        state0 = sq.new_zeros(N, H, Dk, Dv + 1)
    else:
        state0 = initial_state.to(acc)
    S_max = int(counts.max()) if N > 0 and S > 0 else 0
    where = (seg_seq, seg_pos)

    def per_sequence(x):  # (S, ...) -> (N, S_max, ...), zeros for the segments a sequence does not have
        return x.new_zeros(N, S_max, *x.shape[1:]).index_put(where, x)

    U = torch.einsum("slhk,slhv->shkv", sk, vz)  # (S, H, Dk, Dv + 1)
    z_before = _exclusive_cumsum(per_sequence(U[..., Dv]), state0[..., Dv])  # (N, S_max, H, Dk)
    if update == "linear":
        # (N, S_max, H, Dk, Dv)
        states_before = _exclusive_cumsum(per_sequence(U[..., :Dv]), state0[..., :Dv])
        M_final = state0[..., :Dv] + per_sequence(U[..., :Dv]).sum(1)
    else:
        den_k = torch.einsum("slhk,shk->slh", sk, z_before[where]) + eps
        W = per_sequence(torch.einsum("slhk,slh,slhj->shkj", sk, 1 / den_k, sk))  # (N, S_max, H, Dk, Dk)
        U_M = per_sequence(U[..., :Dv])
        M = state0[..., :Dv]
        before = []
        for s in range(S_max):
            before.append(M)
            M = M - W[:, s] @ M + U_M[:, s]
        states_before = torch.stack(before, dim=1) if before else M.new_zeros(N, 0, H, Dk, Dv)
        M_final = M
    M_seg, z_seg = states_before[where], z_before[where]  # (S, H, Dk, Dv), (S, H, Dk)
    numerator = torch.einsum("slhk,shkv->slhv", sq, M_seg)
    denominator = torch.einsum("slhk,shk->slh", sq, z_seg) + eps
    read = (numerator / denominator[..., None]).reshape(S * L, H, Dv)
    # back to token order: every token sits in exactly one slot
    slot = torch.empty(B * T, dtype=torch.long, device=q.device)
    slot[index[valid]] = torch.arange(S * L, device=q.device).view(S, L)[valid]
    out = read[slot].view(B, T, H, Dv).to(v.dtype)
    final = None
    if output_final_state:
        z_final = state0[..., Dv] + per_sequence(U[..., Dv]).sum(1)
        final = torch.cat([M_final, z_final[..., None]], dim=-1)
    return out, final
