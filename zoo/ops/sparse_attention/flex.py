"""Sparse attention through PyTorch's FlexAttention (``torch.nn.attention.flex_attention``) with a block mask.

The pattern of ``pattern.py`` (Longformer's window and global tokens, Beltagy et al. 2020, arXiv:2004.05150;
BigBird's block layout, Zaheer et al. 2020, arXiv:2007.14062) is handed to FlexAttention twice: as a ``mask_mod``
(which query may attend which key, token by token) and as a ``BlockMask`` (which square tiles of tokens hold any
allowed pair, and which hold only allowed pairs), built here at tile resolution in O((T / tile)^2) without
evaluating the T x T mask. Tiles the block mask leaves out are never computed; that is where the speed comes from
once FlexAttention is compiled (a fused kernel, O(T * w) memory). Tiles are FlexAttention's default 128 tokens,
except for a block layout on the CPU whose blocks are a multiple of 16 below 128: tiles of one block, so that a
tile is attended whole or not at all (BigBird's 64-token blocks ran about twice as fast as with 128-token tiles
on this CPU; CUDA keeps 128).

- BigBird's counts (a random block repeating a window or global block enters the softmax once more; transformers'
  eval-mode plan points every random block at block 0) are a ``score_mod`` adding ``log(count)`` to the score, read
  from a (H or 1, blocks, blocks) table: ``count * exp(score)`` as the oracle weighs it.
- Longformer's separate projections for global queries: FlexAttention computes every row with q, k, v (local
  queries reach global keys through them, as the paper and transformers do), then the rows of global queries are
  recomputed with ``global_q`` / ``global_k`` / ``global_v`` over every key, one (G, T) product
  (:func:`zoo.ops.sparse_attention.chunk.global_query_rows`, shared with the chunked form).
- Lengths are padded here to a whole number of tiles; padding keys are masked, padding rows dropped.

What FlexAttention does not do, and where ``sparse_attention`` sends it instead (``chunk.py``): dropout on the
attention weights, and gradients on the CPU (PyTorch's CPU FlexAttention is forward-only). The compiled CPU kernel
takes float32 and half precision only; float64 runs FlexAttention's unfused reference (dense scores, for tests).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from zoo.ops.sparse_attention.pattern import SparsePattern

# FlexAttention's default tile
FLEX_BLOCK = 128


def layout_tile(block_size: int, device) -> int:
    """The tile of a block layout's mask: one block on the CPU when a multiple of 16 below 128, else 128."""
    on_cpu = torch.device(device).type == "cpu"
    return block_size if on_cpu and block_size % 16 == 0 and block_size < FLEX_BLOCK else FLEX_BLOCK


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """flex_attention compiled once per process (FlexAttention's fused kernel exists only under torch.compile)."""
    return torch.compile(flex_attention, dynamic=False)


def supports_grad(device: torch.device) -> bool:
    """Whether FlexAttention has a backward on ``device`` (PyTorch's CPU FlexAttention refuses inputs that
    require grad)."""
    return device.type != "cpu"


def can_compile(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled FlexAttention kernel takes ``dtype`` on ``device`` (the CPU one: no float64)."""
    return device.type != "cpu" or dtype in (torch.float32, torch.float16, torch.bfloat16)


def _run(q, k, v, score_mod, block_mask, scale, compiled: bool):
    """flex_attention on (B, T, H, D) tensors, returning (B, T, H, Dv)."""
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if not torch.is_grad_enabled():
        # leaves that require grad under no_grad: the CPU frontend refuses them although nothing is differentiated
        args = tuple(x.detach() for x in args)
    fn = flex_attention
    if compiled and not torch.compiler.is_compiling():
        fn = _compiled_flex()
    out = fn(*args, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


def _pad_time(x: torch.Tensor, Tp: int, value=0) -> torch.Tensor:
    """x (B, T, ...) padded along time to Tp."""
    pad = [0, 0] * (x.dim() - 2) + [0, Tp - x.shape[1]]
    return F.pad(x, pad, value=value)


def _block_mask(any_: torch.Tensor, full: torch.Tensor | None, mask_mod, Tp: int, tile: int) -> BlockMask:
    """A BlockMask from (B, H, nq, nk) bool tiles: ``any_`` holds an allowed pair, ``full`` holds only allowed
    pairs (None: none is assumed full). Partial tiles are those in ``any_`` and not in ``full``."""

    def as_indices(tiles):
        num = tiles.sum(-1, dtype=torch.int32)
        # the tiles' columns, those present first, in ascending order
        order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, order

    partial = any_ if full is None else any_ & ~full
    kv_num, kv_idx = as_indices(partial)
    full_num = full_idx = None
    if full is not None:
        full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod, seq_lengths=(Tp, Tp)
    )


def _tile_bounds(n: int, tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last token of each of ``n`` tiles."""
    first = torch.arange(n, device=device) * tile
    return first, first + tile - 1


def window_block_mask(
    pattern: SparsePattern,
    T: int,
    is_global: torch.Tensor | None,
    key_ok: torch.Tensor,
    segment_ids: torch.Tensor | None,
) -> BlockMask:
    """The window / global-token pattern over T tokens padded to whole tiles: ``is_global`` (B, T) bool or None,
    ``key_ok`` (B, T) bool (real keys), ``segment_ids`` (B, T) or None."""
    B = key_ok.shape[0]
    device = key_ok.device
    n = -(-T // FLEX_BLOCK)
    Tp = n * FLEX_BLOCK
    w, causal = pattern.window, pattern.causal
    key_ok_p = _pad_time(key_ok, Tp, value=False)  # (B, Tp): padding keys never attended
    glob_p = None if is_global is None else _pad_time(is_global, Tp, value=False)
    seg_p = None if segment_ids is None else _pad_time(segment_ids, Tp, value=-1)

    def mask_mod(b, h, i, j):
        d = i - j
        ok = d == d
        if w is not None:
            ok = d.abs() <= w
        if glob_p is not None:
            ok = ok | glob_p[b, i] | glob_p[b, j]
        if causal:
            ok = ok & (d >= 0)
        ok = ok & key_ok_p[b, j]
        if seg_p is not None:
            ok = ok & (seg_p[b, i] == seg_p[b, j])
        return ok

    # tiles: which hold an allowed pair (any) and which hold only allowed ones (full)
    first, last = _tile_bounds(n, FLEX_BLOCK, device)
    qa, qb = first[:, None], last[:, None]  # query tiles (rows): first and last query
    kc, kd = first[None, :], last[None, :]  # key tiles (columns): first and last key
    if w is None:
        win_any = torch.ones(n, n, dtype=torch.bool, device=device)
        win_full = win_any.clone()
    elif causal:
        win_any = (qa - kd) <= w
        win_full = (qb - kc) <= w
    else:
        win_any = torch.maximum(torch.maximum(kc - qb, qa - kd), torch.zeros_like(qa)) <= w
        win_full = torch.maximum(qb - kc, kd - qa) <= w
    if causal:
        win_any = win_any & (kc <= qb)
        win_full = win_full & (kd <= qa)
    tiles_ok = key_ok_p.view(B, n, FLEX_BLOCK)
    any_ = win_any[None] & tiles_ok.any(-1)[:, None, :]  # (B, n, n)
    if glob_p is not None:
        g = glob_p.view(B, n, FLEX_BLOCK).any(-1)
        reach = g[:, :, None] | g[:, None, :]
        if causal:
            reach = reach & (kc <= qb)
        any_ = any_ | (reach & tiles_ok.any(-1)[:, None, :])
    full = None
    if seg_p is None:
        full = (win_full[None] & tiles_ok.all(-1)[:, None, :])[:, None]
    return _block_mask(any_[:, None], full, mask_mod, Tp, FLEX_BLOCK)


def flex_sparse_attention(
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
    compiled: bool = True,
) -> torch.Tensor:
    """The window / global-token pattern; arguments as validated by ``sparse_attention``, ``is_global`` (B, T)
    bool or None. ``compiled=False`` runs FlexAttention's unfused reference."""
    from zoo.ops.sparse_attention.chunk import global_indices, global_query_rows

    B, T, H, D = q.shape
    key_ok = torch.ones(B, T, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        key_ok = key_ok & key_padding_mask
    block_mask = window_block_mask(pattern, T, is_global, key_ok, segment_ids)
    Tp = block_mask.seq_lengths[0]
    qp, kp, vp = (_pad_time(x, Tp) for x in (q, k, v))
    out = _run(qp, kp, vp, None, block_mask, scale, compiled)[:, :T]
    if global_q is not None and is_global is not None and bool(is_global.any()):
        # Longformer: global queries attend with their own projections; their rows are recomputed
        gidx, greal = global_indices(is_global)
        out = global_query_rows(
            out, global_q, global_k, global_v, gidx, greal, key_ok, pattern, segment_ids, scale, 0.0
        )
    return out


def layout_block_mask(
    pattern: SparsePattern,
    T: int,
    key_padding_mask: torch.Tensor | None,
    plan: torch.Tensor | None,
    batch: int,
    device,
    score_dtype: torch.dtype = torch.float32,
    tile: int | None = None,
):
    """BigBird's block layout over T tokens padded to whole tiles: ``(block_mask, score_mod)``, ``score_mod``
    None unless a random block repeats a window or global one (then it adds ``log(count)``, in ``score_dtype``).
    ``key_padding_mask`` (B, T) or None, ``plan`` (H or 1, nb, r) or None; ``tile`` default :func:`layout_tile`."""
    from zoo.ops.sparse_attention.naive import block_counts

    bs = pattern.block_size
    nb = pattern.num_blocks(T)
    tile = tile or layout_tile(bs, device)
    n = -(-T // tile)
    Tp = n * tile
    # 1. the layout's counts between blocks, (H or 1, nbp, nbp), zero past the last block
    starts = (torch.arange(nb, device=device) * bs)[None]
    counts = block_counts(pattern, starts, starts, nb, plan)[0]  # (H or 1, nb, nb)
    nbp = -(-Tp // bs)
    counts = F.pad(counts, (0, nbp - nb, 0, nbp - nb))
    Hc = counts.shape[0]
    key_ok = torch.arange(Tp, device=device)[None] < T
    if key_padding_mask is not None:
        key_ok = key_ok & _pad_time(key_padding_mask, Tp, value=False)
    key_ok = key_ok.expand(batch, Tp)
    causal = pattern.causal

    def head(h):
        return h if Hc > 1 else 0

    def mask_mod(b, h, i, j):
        ok = (counts[head(h), i // bs, j // bs] > 0) & key_ok[b, j]
        if causal:
            ok = ok & (j <= i)
        return ok

    score_mod = None
    if bool((counts > 1).any()):
        log_counts = torch.log(counts.clamp(min=1).to(score_dtype))

        def score_mod(score, b, h, i, j):
            return score + log_counts[head(h), i // bs, j // bs]

    # 2. tiles: a tile covers the layout's blocks it overlaps; any = one of them is attended, full = all of them
    # are attended exactly once, every key is real and (causal) every key precedes every query
    first, last = _tile_bounds(n, tile, device)
    blocks = torch.arange(nbp, device=device)
    cover = ((blocks[None] * bs) <= last[:, None]) & ((blocks[None] + 1) * bs > first[:, None])  # (n, nbp)
    cover = cover.to(torch.float32)
    pairs = cover.sum(-1)[:, None] * cover.sum(-1)[None, :]  # (n, n)
    any_ = (cover @ (counts > 0).to(torch.float32) @ cover.T) > 0  # (Hc, n, n)
    single = (cover @ (counts == 1).to(torch.float32) @ cover.T) == pairs
    tiles_ok = key_ok.view(batch, n, tile)
    any_ = any_[None] & tiles_ok.any(-1)[:, None, None, :]  # (B, Hc, n, n)
    full = single[None] & tiles_ok.all(-1)[:, None, None, :]
    if causal:
        full = full & (last[None, :] <= first[:, None])
    return _block_mask(any_, full, mask_mod, Tp, tile), score_mod


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    plan: torch.Tensor | None,
    compiled: bool = True,
) -> torch.Tensor:
    """BigBird's block layout; arguments as validated by ``sparse_attention``, ``plan`` (H or 1, nb, r) or None.
    ``compiled=False`` runs FlexAttention's unfused reference."""
    B, T = q.shape[:2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    block_mask, score_mod = layout_block_mask(pattern, T, key_padding_mask, plan, B, q.device, acc)
    Tp = block_mask.seq_lengths[0]
    qp, kp, vp = (_pad_time(x, Tp) for x in (q, k, v))
    return _run(qp, kp, vp, score_mod, block_mask, scale, compiled)[:, :T]
