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
    if dropout == 0.0 and is_global is None:
        return _fused_blocks(q_blocks, [k_band], [v_band], [allowed], scale)[:, :T]

    if is_global is None:  # with dropout on the probabilities: the scores, the softmax
        scores = torch.einsum("bnqhd,bnhdl->bnhql", q_blocks, k_band).to(acc) * scale  # (B, nb, H, block, L)
        probs = F.dropout(masked_softmax(scores, allowed), dropout).to(v.dtype)
        out = torch.einsum("bnhql,bnhdl->bnqhd", probs, v_band)
        return out.reshape(B, nb * block, H, D)[:, :T]

    # 3. global keys, scored by every query beside its band
    gidx, greal = global_indices(is_global)  # (B, G)
    G = gidx.shape[1]
    take = gidx[:, :, None, None].expand(B, G, H, D)
    k_glob, v_glob = k.gather(1, take), v.gather(1, take)  # (B, G, H, D)
    g_allowed = (greal & key_ok_global.gather(1, gidx))[:, None, None, :]  # (B, 1, 1, G)
    q_pos = torch.arange(nb * block, device=device).view(1, nb, block, 1)
    if pattern.causal:
        g_allowed = g_allowed & (gidx[:, None, None, :] <= q_pos)
    if segment_ids is not None:
        g_allowed = g_allowed & (seg_q[..., None] == segment_ids.gather(1, gidx)[:, None, None, :])
    g_allowed = g_allowed.expand(B, nb, block, G)[:, :, None]  # (B, nb, 1, block, G)
    if dropout == 0.0:
        k_g = k_glob.permute(0, 2, 3, 1)[:, None].expand(B, nb, H, D, G)  # as the bands: (B, nb, H, D, G)
        v_g = v_glob.permute(0, 2, 3, 1)[:, None].expand(B, nb, H, v.shape[-1], G)
        out = _fused_blocks(q_blocks, [k_band, k_g], [v_band, v_g], [allowed, g_allowed], scale)[:, :T]
    else:
        scores = torch.einsum("bnqhd,bnhdl->bnhql", q_blocks, k_band).to(acc) * scale  # (B, nb, H, block, L)
        out = _band_and_global(scores, allowed, q_blocks, k_glob, v_glob, g_allowed, v_band, scale, acc, dropout)
        out = out.reshape(B, nb * block, H, v.shape[-1])[:, :T]

    # 4. global queries attend every key (their own projections when given); their rows replace the banded ones
    return global_query_rows(
        out, global_q if global_q is not None else q, global_k if global_k is not None else k,
        global_v if global_v is not None else v, gidx, greal, key_ok_global, pattern, segment_ids, scale, dropout,
    )  # fmt: skip


def _fused_blocks(q_blocks, keys, values, allowed, scale: float) -> torch.Tensor:
    """Attention of each block of queries ``q_blocks`` (B, nb, block, H, D) over its keys and values, given as
    parts (B, nb, H, D, n) with their masks (B, nb, 1, block, n), in one fused ``scaled_dot_product_attention``
    (no (block, n) probabilities kept for the backward; a row with no key allowed gives zeros, as
    ``masked_softmax``). Returns (B, nb * block, H, Dv)."""
    B, nb, block, H, D = q_blocks.shape
    k = torch.cat([x.transpose(-1, -2) for x in keys], -2)  # (B, nb, H, n, D), contiguous
    v = torch.cat([x.transpose(-1, -2) for x in values], -2)
    mask = torch.cat([a.expand(B, nb, 1, block, a.shape[-1]) for a in allowed], -1)
    out = F.scaled_dot_product_attention(
        q_blocks.transpose(2, 3).flatten(0, 1),  # (B * nb, H, block, D)
        k.flatten(0, 1),
        v.flatten(0, 1),
        attn_mask=mask.flatten(0, 1),  # (B * nb, 1, block, n): the same for every head
        scale=scale,
    )  # (B * nb, H, block, Dv)
    return out.view(B, nb, H, block, -1).transpose(2, 3).reshape(B, nb * block, H, -1)


def _band_and_global(scores, allowed, q_blocks, k_glob, v_glob, g_allowed, v_band, scale, acc, dropout):
    """Band scores (B, nb, H, block, L) and global keys with dropout on the probabilities: one softmax over both;
    returns (B, nb, block, H, Dv)."""
    g_scores = torch.einsum("bnqhd,bghd->bnhqg", q_blocks, k_glob).to(acc) * scale  # (B, nb, H, block, G)
    # one softmax over band and global scores, without concatenating them (a copy of every band score)
    scores = scores.masked_fill(~allowed, float("-inf"))
    g_scores = g_scores.masked_fill(~g_allowed, float("-inf"))
    top = torch.maximum(scores.amax(-1, keepdim=True), g_scores.amax(-1, keepdim=True)).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e, g_e = torch.exp(scores - top), torch.exp(g_scores - top)
    total = e.sum(-1, keepdim=True) + g_e.sum(-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    probs = F.dropout(e / total, dropout).to(v_band.dtype)
    g_probs = F.dropout(g_e / total, dropout).to(v_band.dtype)
    out = torch.einsum("bnhql,bnhdl->bnqhd", probs, v_band)
    return out + torch.einsum("bnhqg,bghd->bnqhd", g_probs, v_glob)  # (B, nb, block, H, Dv)


def global_query_rows(
    out: torch.Tensor,
    gq: torch.Tensor,
    gk: torch.Tensor,
    gv: torch.Tensor,
    gidx: torch.Tensor,
    greal: torch.Tensor,
    key_ok: torch.Tensor,
    pattern: SparsePattern,
    segment_ids: torch.Tensor | None,
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """``out`` (B, T, H, Dv) with the rows of the global queries ``gidx`` (B, G; ``greal`` marks the real slots)
    replaced by their attention over every key: query ``gq`` at those rows over keys ``gk`` and values ``gv`` (all
    (B, T, H, D)), keys restricted by ``key_ok`` (B, T), causality and segments. One (G, T) product, linear in T."""
    B, T, H, _ = out.shape
    G = gidx.shape[1]
    acc = torch.float32 if gq.dtype in (torch.float16, torch.bfloat16) else gq.dtype
    gq = gq.gather(1, gidx[:, :, None, None].expand(B, G, H, gq.shape[-1]))  # (B, G, H, D)
    row_scores = torch.einsum("bghd,bthd->bhgt", gq, gk).to(acc) * scale  # (B, H, G, T)
    row_allowed = greal[:, :, None] & key_ok[:, None, :]  # (B, G, T)
    pos = torch.arange(T, device=out.device)
    if pattern.causal:
        row_allowed = row_allowed & (pos[None, None, :] <= gidx[:, :, None])
    if segment_ids is not None:
        row_allowed = row_allowed & (segment_ids.gather(1, gidx)[:, :, None] == segment_ids[:, None, :])
    row_probs = F.dropout(masked_softmax(row_scores, row_allowed[:, None]), dropout).to(gv.dtype)
    rows = torch.einsum("bhgt,bthd->bghd", row_probs, gv).to(out.dtype)  # (B, G, H, Dv)
    # slots that are not real write to a spare row T, dropped after
    Dv = out.shape[-1]
    target = torch.where(greal, gidx, torch.full_like(gidx, T))[:, :, None, None].expand(B, G, H, Dv)
    out = torch.cat([out, out.new_zeros(B, 1, H, Dv)], 1).scatter(1, target, rows)
    return out[:, :T]


def chunk_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    plan: torch.Tensor | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """BigBird's block layout (Zaheer et al. 2020, arXiv:2007.14062) in blocks: each query block gathers the key
    blocks it attends (global, window, random: ``(2g + W + r) * block_size`` keys) and runs one softmax over them;
    the global query blocks attend every key in one (G * block_size, T) product. Memory O(T * block_size * (W + 2g
    + r)); no T x T matrix. Arguments as validated by ``sparse_attention``, ``plan`` (H or 1, nb, r) or None."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    b = pattern.block_size
    nb = pattern.num_blocks(T)
    Tp = nb * b
    device = q.device
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    pad = (0, 0, 0, 0, 0, Tp - T)
    qp, kp, vp = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    key_ok = torch.arange(Tp, device=device)[None] < T  # (1 or B, Tp): real keys
    if key_padding_mask is not None:
        key_ok = key_ok & F.pad(key_padding_mask, (0, Tp - T), value=False)
    block_ids = torch.arange(nb, device=device)
    is_global = pattern.global_block_mask(block_ids, nb)  # (nb,)
    tok = torch.arange(b, device=device)
    q_pos = (block_ids[:, None] * b + tok)[:, :, None]  # (nb, b, 1): query positions per block

    qh = qp.view(B, nb, b, H, D).permute(0, 3, 1, 2, 4)  # (B, H, nb, b, D)
    kh = kp.view(B, nb, b, H, D).permute(0, 3, 1, 2, 4)
    vh = vp.view(B, nb, b, H, Dv).permute(0, 3, 1, 2, 4)
    ok_blocks = key_ok.view(key_ok.shape[0], nb, b)  # (B or 1, nb, b)

    def allowed_at(k_block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mask over the tokens of key blocks ``k_block`` (..., n_blocks) gathered per query block, broadcast to
        (B or 1, H or 1, nb, b, n_blocks * b)."""
        kbc = k_block.clamp(0, nb - 1)
        ok = ok_blocks[:, kbc] & valid[None, ..., None]  # (B, *k_block.shape, b)
        k_pos = kbc[..., None] * b + tok
        if pattern.causal:
            ok = ok[..., None, :, :] & (
                k_pos[..., None, :, :] <= q_pos[:, :, :, None]
            )  # (B, [H,] nb, b, n, b)
        else:
            ok = ok[..., None, :, :].expand(*ok.shape[:-2], b, *ok.shape[-2:])
        ok = ok.flatten(-2)
        return ok if ok.dim() == 5 else ok[:, None]

    # 1. global key blocks (the same for every query block)
    g_list = [
        n
        for n in range(nb)
        if n < pattern.global_blocks or (not pattern.causal and n >= nb - pattern.global_blocks)
    ]
    g_ids = torch.tensor(g_list, dtype=torch.long, device=device)  # (Ng,)
    k_glob, v_glob = kh[:, :, g_ids].flatten(2, 3), vh[:, :, g_ids].flatten(2, 3)  # (B, H, Ng * b, D)
    a_glob = allowed_at(
        g_ids[None].expand(nb, -1), torch.ones(nb, len(g_ids), dtype=torch.bool, device=device)
    )

    # 2. window blocks, those that are not global (which count once)
    if pattern.causal:
        offsets = torch.arange(-pattern.window_blocks + 1, 1, device=device)
    else:
        half = pattern.window_blocks // 2
        offsets = torch.arange(-half, half + 1, device=device)
    w_ids = block_ids[:, None] + offsets  # (nb, W)
    w_valid = (w_ids >= 0) & (w_ids < nb)
    w_valid = w_valid & ~is_global[w_ids.clamp(0, nb - 1)]
    w_idx = w_ids.clamp(0, nb - 1)
    k_win, v_win = kh[:, :, w_idx].flatten(3, 4), vh[:, :, w_idx].flatten(3, 4)  # (B, H, nb, W * b, D)
    a_win = allowed_at(w_ids, w_valid)

    # key and value blocks per query block: global ones shared by all (B, H, Ng * b, D), the others gathered
    # per query block (B, H, nb, n * b, D)
    keys, vals, allowed = [k_win], [v_win], [a_glob, a_win]
    # 3. random blocks, per head and query block
    if plan is not None and plan.shape[-1] > 0:
        Hp, _, r = plan.shape
        r_idx = plan.clamp(min=0).expand(H, nb, r)
        heads = torch.arange(H, device=device)[:, None, None]
        keys.append(kh[:, heads, r_idx].flatten(3, 4))  # (B, H, nb, r * b, D)
        vals.append(vh[:, heads, r_idx].flatten(3, 4))
        allowed.append(allowed_at(plan, plan >= 0))
    allowed = torch.cat([a.expand(a.shape[0], H, nb, b, -1) for a in allowed], -1)  # (B or 1, H, nb, b, L)
    if dropout == 0.0:
        # one fused attention over each block's keys (global, window, random): no (b, L) probabilities kept for
        # the backward; a row with no key allowed gives zeros, as masked_softmax does
        shared = (B, H, nb, *k_glob.shape[2:])
        out = F.scaled_dot_product_attention(
            qh.flatten(1, 2),
            torch.cat([k_glob[:, :, None].expand(shared), *keys], 3).flatten(1, 2),
            torch.cat([v_glob[:, :, None].expand(*shared[:-1], Dv), *vals], 3).flatten(1, 2),
            attn_mask=allowed.expand(B, H, nb, b, -1).flatten(1, 2),
            scale=scale,
        ).view(B, H, nb, b, Dv)
    else:  # with dropout on the probabilities, as transformers draws it
        scores = [torch.einsum("bhnqd,bhkd->bhnqk", qh, k_glob)]
        scores += [torch.einsum("bhnqd,bhnkd->bhnqk", qh, kk) for kk in keys]
        widths = [x.shape[-1] for x in scores]
        scores = torch.cat(scores, -1).to(acc) * scale  # (B, H, nb, b, L)
        probs = F.dropout(masked_softmax(scores, allowed), dropout).to(v.dtype)
        p_glob, *p_rest = probs.split(widths, -1)
        out = torch.einsum("bhnqk,bhkd->bhnqd", p_glob, v_glob)
        for p, val in zip(p_rest, vals):
            out = out + torch.einsum("bhnqk,bhnkd->bhnqd", p, val)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, Tp, H, Dv)

    # 4. global query blocks attend every key (causal: every earlier one); their rows replace the blocked ones
    if len(g_ids):
        g_pos = (g_ids[:, None] * b + tok).flatten()  # (Ng * b,)
        row_scores = torch.einsum("bghd,bthd->bhgt", qp[:, g_pos], kp).to(acc) * scale  # (B, H, Ng * b, Tp)
        row_ok = key_ok[:, None, None, :]
        if pattern.causal:
            row_ok = row_ok & (torch.arange(Tp, device=device)[None, :] <= g_pos[:, None])[None, None]
        row_probs = F.dropout(masked_softmax(row_scores, row_ok), dropout).to(v.dtype)
        rows = torch.einsum("bhgt,bthd->bghd", row_probs, vp)
        out = out.index_copy(1, g_pos, rows.to(out.dtype))
    return out[:, :T]
