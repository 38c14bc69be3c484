"""The masked scores of one block of the Triton LSH / local attention (``triton.py``): a device function inlined
into its kernels.

Same rule as ``naive.py`` (Reformer, Kitaev et al. 2020, "Reformer: The Efficient Transformer",
arXiv:2001.04451): a key that is padding, of another segment or (causal) after the query scores ``MASKED``; the
query's own position then scores ``OWN`` (LSH attention only); slots past the chunk score ``-inf`` (they are not
keys at all). Kept apart from the kernels so that every ``@triton.jit`` function of ``triton.py`` is a kernel
that is launched (and compiled for GPU targets by ``tests/ops/test_triton_gpu_compile.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _masked_scores(
    s,  # (BC, BC) q . k in the accumulator dtype
    pos_q,  # (BC,) positions of the queries
    pos_k,  # (BC,) positions of the keys
    seg_q,  # (BC,) segments of the queries (read only with HAS_SEG)
    seg_k,  # (BC,) segments of the keys
    key_ok,  # (BC,) the key may be attended at all (not padding)
    col_ok,  # (BC,) the slot is inside the chunk
    CAUSAL: tl.constexpr,
    SELF: tl.constexpr,
    HAS_SEG: tl.constexpr,
    MASKED: tl.constexpr,
    OWN: tl.constexpr,
):
    """The scores as the softmax sees them, and where they are still ``q . k`` (the entries with a gradient)."""
    allowed = key_ok[None, :]
    if CAUSAL:
        allowed = allowed & (pos_q[:, None] >= pos_k[None, :])
    if HAS_SEG:
        allowed = allowed & (seg_q[:, None] == seg_k[None, :])
    s = tl.where(allowed, s, MASKED)
    if SELF:
        own = pos_q[:, None] == pos_k[None, :]
        s = tl.where(own, OWN, s)
        allowed = allowed & ~own
    s = tl.where(col_ok[None, :], s, float("-inf"))
    return s, allowed & col_ok[None, :]


@triton.jit
def _load_rows(x, rows, row_ok, width, BW: tl.constexpr):
    """(BC, BW) block of the rows ``rows`` of a (rows, width) matrix at ``x``, zeros outside."""
    cols = tl.arange(0, BW)
    return tl.load(
        x + rows[:, None] * width + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < width), other=0.0
    )


@triton.jit
def _load_slots(pos, ok, seg, rows, row_ok, HAS_SEG: tl.constexpr):
    """Positions (-1 outside the chunk), key-ok flags and segments of the slots ``rows``; ``ok`` and ``seg`` are
    the (T,) rows of the sequence, read at the positions."""
    p = tl.load(pos + rows, mask=row_ok, other=-1)
    key_ok = tl.load(ok + p, mask=row_ok, other=0) != 0
    if HAS_SEG:
        s = tl.load(seg + p, mask=row_ok, other=-1)
    else:
        s = p
    return p, key_ok, s
