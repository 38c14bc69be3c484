"""The attention pattern of ``sparse_attention``, described once for every form of the op.

A query attends a key when the pattern allows it (sliding window, global tokens, causality), the key is a real token
(key padding mask) and both belong to the same packed document (segment ids). The pattern is the union of:

- a sliding window: key j is in query i's window when |i - j| <= window (bidirectional; Longformer, Beltagy et al.
  2020, arXiv:2004.05150, where ``window`` is ``attention_window / 2``) or when 0 <= i - j <= window (causal);
- global tokens (static positions here, per-example ones through the op's ``global_mask``): a global query attends
  every key, and every query attends a global key.

BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", arXiv:2007.14062) describes its
pattern in blocks of ``block_size`` tokens (its "ITC" layout). Time is cut into ``nb = ceil(T / block_size)``
blocks (the op pads the last one); a query in block n attends the keys of:

- ``window_blocks`` neighbouring blocks: n - (W-1)/2 ... n + (W-1)/2 (W odd; BigBird's 3), or, causal, the W
  blocks n - W + 1 ... n;
- ``global_blocks`` blocks at each end (BigBird's 1: the first and the last block; causal: the first ones only).
  A query in a global block attends every key (causal: every earlier key);
- ``random_blocks`` (r) blocks per query block and per head, from a plan: an explicit index tensor
  ``(H or 1, nb, r)`` given to the op (``-1``: no block), or drawn by :meth:`SparsePattern.random_plan` from
  ``seed`` (r blocks outside the query block's window and the global blocks, fewer when fewer exist; a hash of
  ``(seed, head, n, m)`` ranks the candidates, so the draw touches no global random state and, causal, does not
  depend on the length). A random block is attended in addition to the window and global blocks: one that is
  also among them (as in transformers' eval-mode plan, where every random block is block 0) enters the softmax
  once more, so that its keys weigh ``1 + count`` times. Rows of the plan for global query blocks are ignored.

Window and global blocks that overlap count once. Causal layouts also mask keys after the query inside a block. A
block layout is set by ``window_blocks >= 1`` with ``block_size``; it excludes the token ``window`` and
``global_tokens``.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SparsePattern:
    """Which keys each query may attend.

    Args:
        window: one-sided width of the sliding window in tokens (``None``: no window, every key is in reach).
        causal: keys after the query are never attended (global tokens included).
        global_tokens: positions that attend and are attended by all; negative positions count from the end.
        block_size: the tile of the blocked forms, in tokens; ``None`` lets the op choose from the window. In
            BigBird's layout it is also the unit of the pattern.
        window_blocks: BigBird's window in blocks (odd when bidirectional; BigBird's 3); nonzero makes this a block
            layout, in blocks of ``block_size`` tokens.
        global_blocks: global blocks at each end (causal: at the start only); BigBird's 1.
        random_blocks: random key blocks per query block and head (BigBird's r, 3 by default there).
        seed: seeds the random plan (:meth:`random_plan`); different layers take different seeds.
    """

    window: int | None = None
    causal: bool = False
    global_tokens: tuple[int, ...] = ()
    block_size: int | None = None
    window_blocks: int = 0
    global_blocks: int = 0
    random_blocks: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or self.window < 0):
            raise ValueError(f"SparsePattern: window={self.window!r}, expected None or an integer >= 0")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(
                f"SparsePattern: block_size={self.block_size!r}, expected None or an integer >= 1"
            )
        if not all(isinstance(p, int) for p in self.global_tokens):
            raise ValueError(
                f"SparsePattern: global_tokens={self.global_tokens!r}, expected integer positions"
            )
        object.__setattr__(self, "global_tokens", tuple(self.global_tokens))
        for name in ("window_blocks", "global_blocks", "random_blocks", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SparsePattern: {name}={value!r}, expected an integer >= 0")
        if self.window_blocks == 0:
            for name in ("global_blocks", "random_blocks"):
                if getattr(self, name) != 0:
                    raise ValueError(
                        f"SparsePattern: {name}={getattr(self, name)!r} belongs to BigBird's block layout, which "
                        "needs window_blocks >= 1 and block_size"
                    )
            return
        if self.block_size is None:
            raise ValueError("SparsePattern: a block layout (window_blocks >= 1) needs block_size")
        if self.window is not None or self.global_tokens:
            raise ValueError(
                f"SparsePattern: window={self.window!r} / global_tokens={self.global_tokens!r} with a block layout "
                "(window_blocks >= 1): describe the layout in blocks only"
            )
        if not self.causal and self.window_blocks % 2 == 0:
            raise ValueError(
                f"SparsePattern: window_blocks={self.window_blocks} must be odd when bidirectional (centred on the "
                "query block; BigBird's is 3)"
            )

    @property
    def is_block_layout(self) -> bool:
        """Whether the pattern is BigBird's block layout (``window_blocks >= 1``)."""
        return self.window_blocks > 0

    def num_blocks(self, T: int) -> int:
        """Blocks covering T tokens (the last one padded)."""
        return -(-T // self.block_size)

    def global_block_mask(self, block_ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Bool, True at the global blocks among ``block_ids`` of a layout of ``num_blocks`` blocks."""
        is_global = block_ids < self.global_blocks
        if not self.causal:
            is_global = is_global | (block_ids >= num_blocks - self.global_blocks)
        return is_global & (block_ids >= 0) & (block_ids < num_blocks)

    def window_block_mask(self, q_block: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
        """Bool: key block in the window of query block (broadcast against each other)."""
        d = q_block - k_block
        if self.causal:
            return (d >= 0) & (d < self.window_blocks)
        return d.abs() <= self.window_blocks // 2

    def random_plan(self, num_blocks: int, num_heads: int, device=None) -> torch.Tensor:
        """The seeded random plan, ``(num_heads, num_blocks, random_blocks)`` block indices, ``-1`` where a query
        block has fewer candidates than ``random_blocks``. Candidates for query block n: blocks outside its window
        that are not global (causal: before its window). Each candidate m is ranked by a hash of
        ``(seed, head, n, m)``; the r smallest are taken. Deterministic, and no global random state is touched."""
        r = self.random_blocks
        h = torch.arange(num_heads, device=device, dtype=torch.int64)[:, None, None]
        n = torch.arange(num_blocks, device=device, dtype=torch.int64)[None, :, None]
        m = torch.arange(num_blocks, device=device, dtype=torch.int64)[None, None, :]
        rank = _hash64(self.seed * 1_000_003 + h * 7_919 + n * 104_729 + m * 15_485_863)  # (H, nb, nb)
        ok = ~self.window_block_mask(n, m) & ~self.global_block_mask(m, num_blocks)
        if self.causal:
            ok = ok & (m < n)
        limit = torch.iinfo(torch.int64).max
        rank = torch.where(ok, rank, torch.full_like(rank, limit))
        k = min(r, num_blocks)
        top = torch.topk(rank, k, dim=-1, largest=False)
        plan = torch.where(top.values < limit, top.indices, torch.full_like(top.indices, -1))
        if k < r:
            plan = torch.cat([plan, plan.new_full((num_heads, num_blocks, r - k), -1)], -1)
        return plan.expand(num_heads, num_blocks, r)

    def static_global_mask(self, T: int, device=None) -> torch.Tensor | None:
        """(T,) bool, True at ``global_tokens`` (None when there are none); raises for a position outside [0, T)."""
        if not self.global_tokens:
            return None
        mask = torch.zeros(T, dtype=torch.bool, device=device)
        for p in self.global_tokens:
            if not -T <= p < T:
                raise ValueError(
                    f"SparsePattern: global token position {p} is outside a sequence of length {T}"
                )
            mask[p % T] = True
        return mask

    def window_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool mask of the window and causality for query positions ``q_pos`` against key positions ``k_pos``
        (broadcast against each other): what the pattern allows before global tokens are added."""
        d = q_pos - k_pos
        allowed = torch.ones_like(d, dtype=torch.bool)
        if self.window is not None:
            allowed = d.abs() <= self.window
        if self.causal:
            allowed = allowed & (d >= 0)
        return allowed


def _hash64(x: torch.Tensor) -> torch.Tensor:
    """A mixing hash of int64 values (splitmix64's finaliser, with logical shifts), as non-negative int64."""
    low = (1 << 62) - 1

    def shr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)

    x = x ^ shr(x, 30)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ shr(x, 27)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    x = x ^ shr(x, 31)
    return x & low


__all__ = ["SparsePattern"]
