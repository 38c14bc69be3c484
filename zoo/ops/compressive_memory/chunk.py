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

**Rows of equal length** (no ``cu_seqlens``: the model's training forward) take a faster form of the same
equations, :class:`_EqualSegments`: the inputs are laid out head-major once, (B * H, segments, L, D), so that every
batched matmul runs on contiguous blocks without a copy, and its backward is written out instead of autograd's
(which would keep and revisit every intermediate of the forward). With A_s the gradient of the state after segment
s, G_s = σ(Q_s)^T (dO_s / d^q_s) and d^q = σ(Q) z + eps, d^k = σ(K) z + eps (z, M entering the segment):

    linear  A_{s-1} = A_s + G_s                                 (a reverse cumulative sum)
    delta   A_{s-1} = A_s - W_s A_s + G_s                       (W_s symmetric)
    dV_s  = σ(K_s) A_s
    dσ(Q) = (dO / d^q) M^T + dd^q z^T,         dd^q = -rowsum((dO / d^q) M^T ⊙ σ(Q)) / d^q
    dσ(K) = V A_s^T + 1 dz_s^T  [delta: - σ(K) C_s / d^k + dd^k z^T,  C_s = A_s M^T + M A_s^T,
                                         dd^k = rowsum(σ(K) C_s ⊙ σ(K)) / (2 (d^k)^2)]

and the gradient of z the reverse cumulative sum of σ(Q)^T dd^q (+ σ(K)^T dd^k). The retrieval σ(K) M / d^k of
the delta rule is never formed: its products with A_s fold into the small (Dk x Dk) matrix C_s.
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
        return _equal_rows(q, k, v, segment_length, update, eps, initial_state, output_final_state)
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


def _equal_rows(q, k, v, segment_length, update, eps, initial_state, output_final_state):
    """B rows of T tokens each: :class:`_EqualSegments` (see the module docstring)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    state0 = None if initial_state is None else initial_state.to(acc).reshape(B * H, Dk, Dv + 1)
    L = min(segment_length, T)
    out, final = _EqualSegments.apply(q.to(acc), k.to(acc), v.to(acc), state0, L, update == "delta", eps)
    return out.to(v.dtype), final.view(B, H, Dk, Dv + 1) if output_final_state else None


def _exclusive_scan(x: torch.Tensor, start: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """(N, S, ...) -> (N, S, ...): ``start`` + the sum of x over the earlier entries of axis 1 (the later ones
    with ``reverse``), without a subtraction."""
    out = torch.empty_like(x)
    first, rest = (-1, slice(None, -1)) if reverse else (0, slice(1, None))
    out[:, first] = start
    if x.shape[1] > 1:
        body = x[:, 1:] if reverse else x[:, :-1]
        scanned = body.flip(1).cumsum(1).flip(1) if reverse else body.cumsum(1)
        out[:, rest] = scanned + start[:, None]
    return out


class _Layout:
    """Between (B, T, H, D) token order and the head-major (B * H * S, L, D) segments, zero past T."""

    def __init__(self, B: int, T: int, H: int, L: int):
        self.B, self.T, self.H, self.L = B, T, H, L
        self.S = -(-T // L)

    def heads(self, x: torch.Tensor, elu: bool = False) -> torch.Tensor:
        """(B, T, H, D) -> (B H S, L, D), σ(x) - 1 with ``elu``, written straight into the new layout."""
        B, T, H, D = x.shape
        buf = x.new_empty(B, H, self.S * self.L, D)
        buf[:, :, T:] = 0
        into = buf[:, :, :T].transpose(1, 2)  # a (B, T, H, D) view
        if elu:
            torch.ops.aten.elu.out(x, 1.0, 1, 1, out=into)  # ELU(x), alpha = scale = 1
        else:
            into.copy_(x)
        return buf.view(-1, self.L, D)

    def tokens(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """(B H S, L, D) -> (B, T, H, D) contiguous, times ``other`` (broadcastable, same layout) if given."""
        B, H, T, D = self.B, self.H, self.T, x.shape[-1]
        out = x.new_empty(B, T, H, D)
        x = x.view(B, H, -1, D)[:, :, :T]
        if other is None:
            out.transpose(1, 2).copy_(x)
        else:
            torch.mul(x, other.view(B, H, -1, other.shape[-1])[:, :, :T], out=out.transpose(1, 2))
        return out


class _EqualSegments(torch.autograd.Function):
    """The memory over B rows of T tokens, forward and backward written out (see the module docstring).

    q, k (B, T, H, Dk); v (B, T, H, Dv), in the accumulation dtype; state0 (B H, Dk, Dv + 1) or None (empty);
    segments of L tokens. Returns the reads (B, T, H, Dv) and the final state (B H, Dk, Dv + 1). Inside, segments
    are head-major (B H S, L, D) blocks, so that every per-segment product is one ``bmm`` over all segments, on
    views (transposes included) without a copy; the last segment's slots past T are zero and write nothing."""

    @staticmethod
    def forward(ctx, q, k, v, state0, L: int, delta: bool, eps: float):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        lay = _Layout(B, T, H, L)
        N, S = B * H, lay.S
        sq = lay.heads(q, elu=True).add_(1)  # σ(Q), (N S, L, Dk)
        sk = lay.heads(k, elu=True).add_(1)
        if S * L > T:
            sk.view(N, S, L, Dk)[:, -1, T - (S - 1) * L :] = 0
        v = lay.heads(v)
        if state0 is None:
            state0 = q.new_zeros(N, Dk, Dv + 1)
        M0, z0 = state0[..., :Dv], state0[..., Dv]
        z_seg = sk.sum(1).view(N, S, Dk)  # σ(K_s)^T 1
        z_before = _exclusive_scan(z_seg, z0)
        z_col = z_before.view(N * S, Dk, 1)
        U = torch.bmm(sk.transpose(1, 2), v).view(N, S, Dk, Dv)
        W = r_k = None
        if delta:
            r_k = torch.bmm(sk, z_col).add_(eps).reciprocal_()  # (N S, L, 1): 1 / d^k
            # the walk over segments: contiguous (N, Dk, Dk) blocks per step (a strided batch makes bmm slow)
            W = torch.bmm(sk.transpose(1, 2), sk * r_k).view(N, S, Dk, Dk).transpose(0, 1).contiguous()
            U_steps = U.transpose(0, 1).contiguous()
            M_before = torch.empty_like(U)
            M = M0.contiguous()
            for s in range(S):
                M_before[:, s] = M
                M = M - torch.bmm(W[s], M) + U_steps[s]
            M_final = M
        else:
            M_before = _exclusive_scan(U, M0)
            M_final = M_before[:, -1] + U[:, -1]
        r_q = torch.bmm(sq, z_col).add_(eps).reciprocal_()  # (N S, L, 1): 1 / d^q
        out = lay.tokens(torch.bmm(sq, M_before.view(N * S, Dk, Dv)), r_q)
        final = torch.cat([M_final, (z_before[:, -1] + z_seg[:, -1])[..., None]], dim=-1)
        ctx.save_for_backward(sq, sk, v, M_before, z_before, r_q, r_k, W)
        ctx.delta, ctx.layout = delta, lay
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        sq, sk, v, M_before, z_before, r_q, r_k, W = ctx.saved_tensors
        lay = ctx.layout
        N, S, Dk, Dv = M_before.shape
        M_flat = M_before.view(N * S, Dk, Dv)
        z_row = z_before.view(N * S, 1, Dk)
        dM_final, dz_final = d_final[..., :Dv], d_final[..., Dv]
        # the read: dO / d^q, its product with M^T, and the gradients of d^q and of the memory it read
        dn = lay.heads(d_out).mul_(r_q)
        P = torch.bmm(dn, M_flat.transpose(1, 2))  # (N S, L, Dk)
        dd_q = (P * sq).sum(-1, keepdim=True).mul_(r_q).neg_()  # gradient of d^q
        G = torch.bmm(sq.transpose(1, 2), dn).view(N, S, Dk, Dv)
        g_z = torch.bmm(sq.transpose(1, 2), dd_q).view(N, S, Dk)
        d_sq = P.addcmul_(dd_q, z_row)
        # the gradient of the state after each segment: the recurrence backwards
        if ctx.delta:
            A_after = torch.empty_like(G)
            G_steps = G.transpose(0, 1).contiguous()
            A = dM_final.contiguous()
            for s in reversed(range(S)):  # W (S, N, Dk, Dk), symmetric
                A_after[:, s] = A
                A = A - torch.bmm(W[s], A) + G_steps[s]
            dM0 = A
        else:
            A_after = _exclusive_scan(G, dM_final, reverse=True)
            dM0 = A_after[:, 0] + G[:, 0]
        A_flat = A_after.view(N * S, Dk, Dv)
        dv = lay.tokens(torch.bmm(sk, A_flat))
        d_sk = torch.bmm(v, A_flat.transpose(1, 2))
        if ctx.delta:
            C = torch.bmm(A_flat, M_flat.transpose(1, 2))
            C = C + C.transpose(1, 2)  # (N S, Dk, Dk)
            Y = torch.bmm(sk, C)
            dd_k = (Y * sk).sum(-1, keepdim=True).mul_(r_k * r_k * 0.5)  # gradient of d^k
            d_sk.sub_(Y.mul_(r_k)).addcmul_(dd_k, z_row)
            g_z = g_z + torch.bmm(sk.transpose(1, 2), dd_k).view(N, S, Dk)
        dz_after = _exclusive_scan(g_z, dz_final, reverse=True)  # the gradient of z after each segment
        d_sk.add_(dz_after.view(N * S, 1, Dk))
        # through σ = ELU + 1: σ' = 1 where x > 0, else exp(x) = σ(x); so min(σ, 1) (0 on the empty slots)
        dq = lay.tokens(d_sq, sq.clamp(max=1))
        dk = lay.tokens(d_sk, sk.clamp(max=1))
        d_state0 = None
        if ctx.needs_input_grad[3]:
            d_state0 = torch.cat([dM0, (dz_after[:, 0] + g_z[:, 0])[..., None]], dim=-1)
        return dq, dk, dv, d_state0, None, None, None
