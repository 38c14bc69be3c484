"""Sparse attention in blocks: the CPU path, O(T * w) memory, no T x T matrix.

Longformer's pattern (Beltagy et al. 2020, "Longformer: The Long-Document Transformer", arXiv:2004.05150) computed
the way its banded form allows: time is cut into blocks of ``block_size`` queries, and each block attends the band
of keys its window can reach (``block_size + 2w`` keys, ``block_size + w`` when causal), taken from the padded keys
as a strided view. Global keys are gathered once and scored by every block beside its band (and removed from the
band, so that none counts twice); one softmax runs over band and global scores together. Global queries attend every
key in one (G, T) product, linear in T, and their rows replace the banded ones. Every piece is a PyTorch op, so
autograd gives the backward; what it keeps is the (T, band) scores, O(T * w).

Padding to a whole number of blocks happens here: callers pass any length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.ops.sparse_attention.naive import masked_softmax
from zoo.ops.sparse_attention.pattern import SparsePattern


def default_block_size(window: int, T: int) -> int:
    """Blocks of half the window (a band of 5 blocks), at least 16 and at most 64 tokens, never much past T: on this
    CPU, 64-token blocks ran a w = 256 window faster than 128 or 256 (bench numbers in the model card)."""
    size = min(max(window // 2, 16), 64)
    return max(1, min(size, 1 << max(0, math.ceil(math.log2(max(T, 1))))))


def _bands(x: torch.Tensor, left: int, right: int, num_blocks: int, block: int, value=0) -> torch.Tensor:
    """x (B, T, ...) -> (B, num_blocks, ..., block + left + right): for block n, x at n*block - left ... n*block +
    block + right - 1, ``value`` outside [0, T). A strided view of one padded copy."""
    T = x.shape[1]
    pad_after = num_blocks * block - T + right
    dims = [0, 0] * (x.dim() - 2) + [left, pad_after]
    padded = F.pad(x, dims, value=value)
    return padded.unfold(1, block + left + right, block)


def global_indices(is_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> indices (B, G) of the global positions of each row, in order, and which slots are real (rows
    with fewer than G globals are filled with position 0, marked not real). G is the largest count over rows."""
    G = int(is_global.sum(-1).max())
    order = torch.sort(is_global.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :G]
    return order, is_global.gather(1, order)


def chunk_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    scale: float,
    is_global: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    global_q: torch.Tensor | None,
    global_k: torch.Tensor | None,
    global_v: torch.Tensor | None,
    block_size: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Arguments as validated by ``zoo.ops.sparse_attention.sparse_attention``; ``is_global`` (B, T) bool or None."""
    B, T, H, D = q.shape
    device = q.device
    w = T if pattern.window is None else min(pattern.window, T)
    block = block_size or pattern.block_size or default_block_size(w, T)
    nb = -(-T // block)
    left, right = w, (0 if pattern.causal else w)
    L = block + left + right
    # half precision: scores and softmax in float32
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    # 1. band scores: block n of queries against keys n*block - w ... n*block + block - 1 (+ w)
    q_blocks = F.pad(q, (0, 0, 0, 0, 0, nb * block - T)).view(B, nb, block, H, D)
    k_band = _bands(k, left, right, nb, block)  # (B, nb, H, D, L)
    v_band = _bands(v, left, right, nb, block)
    scores = torch.einsum("bnqhd,bnhdl->bnhql", q_blocks, k_band).to(acc) * scale  # (B, nb, H, block, L)

    # 2. what the band may attend: the window (the same for every block), keys inside [0, T), real, not global,
    # in the query's document
    r = torch.arange(block, device=device)[:, None]
    l = torch.arange(L, device=device)[None, :]
    allowed = pattern.window_mask(r + left, l)[None, None]  # (1, 1, block, L): query at left + r of the band
    key_ok = torch.ones(B, T, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        key_ok = key_ok & key_padding_mask
    key_ok_global = key_ok
    if is_global is not None:
        key_ok = key_ok & ~is_global
    allowed = (
        allowed & _bands(key_ok, left, right, nb, block, value=False)[:, :, None, :]
    )  # (B, nb, block, L)
    if segment_ids is not None:
        seg_q = F.pad(segment_ids, (0, nb * block - T), value=-1).view(B, nb, block)
        seg_k = _bands(segment_ids, left, right, nb, block, value=-2)
        allowed = allowed & (seg_q[..., :, None] == seg_k[..., None, :])
    allowed = allowed[:, :, None]  # (B, nb, 1, block, L)

    if is_global is None:
        probs = F.dropout(masked_softmax(scores, allowed), dropout).to(v.dtype)
        out = torch.einsum("bnhql,bnhdl->bnqhd", probs, v_band)
        return out.reshape(B, nb * block, H, D)[:, :T]

    # 3. global keys, scored by every query beside its band
    gidx, greal = global_indices(is_global)  # (B, G)
    G = gidx.shape[1]
    take = gidx[:, :, None, None].expand(B, G, H, D)
    k_glob, v_glob = k.gather(1, take), v.gather(1, take)  # (B, G, H, D)
    g_scores = torch.einsum("bnqhd,bghd->bnhqg", q_blocks, k_glob).to(acc) * scale  # (B, nb, H, block, G)
    g_allowed = (greal & key_ok_global.gather(1, gidx))[:, None, None, :]  # (B, 1, 1, G)
    q_pos = torch.arange(nb * block, device=device).view(1, nb, block, 1)
    if pattern.causal:
        g_allowed = g_allowed & (gidx[:, None, None, :] <= q_pos)
    if segment_ids is not None:
        g_allowed = g_allowed & (seg_q[..., None] == segment_ids.gather(1, gidx)[:, None, None, :])
    g_allowed = g_allowed.expand(B, nb, block, G)[:, :, None]  # (B, nb, 1, block, G)
    # one softmax over band and global scores, without concatenating them (a copy of every band score)
    scores = scores.masked_fill(~allowed, float("-inf"))
    g_scores = g_scores.masked_fill(~g_allowed, float("-inf"))
    top = torch.maximum(scores.amax(-1, keepdim=True), g_scores.amax(-1, keepdim=True)).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e, g_e = torch.exp(scores - top), torch.exp(g_scores - top)
    total = e.sum(-1, keepdim=True) + g_e.sum(-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    probs = F.dropout(e / total, dropout).to(v.dtype)
    g_probs = F.dropout(g_e / total, dropout).to(v.dtype)
    out = torch.einsum("bnhql,bnhdl->bnqhd", probs, v_band)
    out = out + torch.einsum("bnhqg,bghd->bnqhd", g_probs, v_glob)
    out = out.reshape(B, nb * block, H, D)[:, :T]

    # 4. global queries attend every key (their own projections when given); their rows replace the banded ones
    gq = (global_q if global_q is not None else q).gather(1, take)  # (B, G, H, D)
    gk = global_k if global_k is not None else k
    gv = global_v if global_v is not None else v
    row_scores = torch.einsum("bghd,bthd->bhgt", gq, gk).to(acc) * scale  # (B, H, G, T)
    row_allowed = greal[:, :, None] & key_ok_global[:, None, :]  # (B, G, T)
    pos = torch.arange(T, device=device)
    if pattern.causal:
        row_allowed = row_allowed & (pos[None, None, :] <= gidx[:, :, None])
    if segment_ids is not None:
        row_allowed = row_allowed & (segment_ids.gather(1, gidx)[:, :, None] == segment_ids[:, None, :])
    row_probs = F.dropout(masked_softmax(row_scores, row_allowed[:, None]), dropout).to(gv.dtype)
    rows = torch.einsum("bhgt,bthd->bghd", row_probs, gv).to(out.dtype)  # (B, G, H, D)
    # slots that are not real write to a spare row T, dropped after
    target = torch.where(greal, gidx, torch.full_like(gidx, T))[:, :, None, None].expand(B, G, H, D)
    out = torch.cat([out, out.new_zeros(B, 1, H, D)], 1).scatter(1, target, rows)
    return out[:, :T]
