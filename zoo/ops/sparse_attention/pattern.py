"""The attention pattern of ``sparse_attention``, described once for every form of the op.

A query attends a key when the pattern allows it (sliding window, global tokens, causality), the key is a real token
(key padding mask) and both belong to the same packed document (segment ids). The pattern is the union of:

- a sliding window: key j is in query i's window when |i - j| <= window (bidirectional; Longformer, Beltagy et al.
  2020, arXiv:2004.05150, where ``window`` is ``attention_window / 2``) or when 0 <= i - j <= window (causal);
- global tokens (static positions here, per-example ones through the op's ``global_mask``): a global query attends
  every key, and every query attends a global key.

BigBird (Zaheer et al. 2020, arXiv:2007.14062) describes its pattern in blocks of ``block_size`` tokens: a window of
``window_blocks`` blocks, ``global_blocks`` global blocks and ``random_blocks`` random key blocks per query block from
a plan seeded by ``seed``. Those fields are part of the description so that the op's blocked forms, which tile time
in blocks of ``block_size`` already, can take them; this version of the op implements the token-level pattern
(window, global tokens, causality) and refuses a block layout with a ``ValueError`` rather than ignoring it.
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
        window_blocks, global_blocks, random_blocks, seed: BigBird's block layout (not implemented yet: nonzero
            values are refused).
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
        for name in ("window_blocks", "global_blocks", "random_blocks"):
            if getattr(self, name) != 0:
                raise ValueError(
                    f"SparsePattern: {name}={getattr(self, name)!r}: BigBird's block layout is not implemented by "
                    "this version of sparse_attention; describe the pattern with window and global_tokens"
                )

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


__all__ = ["SparsePattern"]
