"""Where sequences start and end inside the chunks of a chunked recurrent op.

The chunked forms of ``zoo.ops.gla`` and ``zoo.ops.wkv4`` treat a batch and a packed row alike: a batch of B rows of
T tokens is B documents, one per row; a packed row (``cu_seqlens``, B == 1) holds N documents one after the other.
Every token is tagged with its document and with where that document starts, so that a chunk can mask out the
tokens of other documents and tell whether the state entering the chunk belongs to the token's document
(``carried``) or the document started inside the chunk (then its own initial state enters instead). No state and
no gradient crosses a document boundary, and the whole batch is still one pass over the chunks.
"""

from __future__ import annotations

import torch


class Documents:
    """Documents of a batch cut into chunks of L tokens (rows padded with empty tokens up to N * L).

    Per token, shape (R, N, L) with R rows (B, or 1 when packed) and N chunks:
        doc: the document index (D for padding tokens: a dummy document past the real ones);
        since_start: tokens since its document's first token (0 at that token);
        carried: whether its document started before the token's chunk (the state entering the chunk is its own).
    Per document, shape (D,): row, first and last token (``first``, ``last``, positions within the row), and
    ``nonempty``; ``ids`` the indices of the non-empty ones.
    """

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, L: int, device: torch.device):
        self.L = L
        self.N = -(-T // L)
        pos = torch.arange(self.N * L, device=device)  # (N L,)
        if cu_seqlens is None:
            self.R, self.D = B, B
            bounds = torch.tensor([0, T], device=device)
            local = torch.searchsorted(bounds, pos, right=True) - 1  # 0 inside, 1 on padding
            doc = torch.where(local == 0, torch.arange(B, device=device)[:, None], B)  # (B, N L)
            start = torch.zeros_like(doc)
            self.row = torch.arange(B, device=device)
            self.first = torch.zeros(B, dtype=torch.long, device=device)
            self.last = torch.full((B,), T - 1, dtype=torch.long, device=device)
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            self.R, self.D = 1, cu.numel() - 1
            doc = (torch.searchsorted(cu, pos, right=True) - 1).clamp(max=self.D)[None]  # (1, N L)
            start = torch.cat([cu[:-1], cu.new_tensor([T])])[doc]
            self.row = torch.zeros(self.D, dtype=torch.long, device=device)
            self.first, self.last = cu[:-1], cu[1:] - 1
        self.nonempty = self.last >= self.first
        self.ids = self.nonempty.nonzero()[:, 0]
        self.empty = (~self.nonempty).nonzero()[:, 0]
        chunk_start = (pos // L) * L
        shape = (self.R, self.N, L)
        self.doc = doc.view(shape)
        self.since_start = (pos - start).view(shape)
        self.carried = (start < chunk_start).view(shape)

    def chunks(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, T, ...) -> (R, N, L, ...) in ``dtype``, zero-padded at the end of each row (packed: one row)."""
        x = x.to(dtype)
        if self.R == 1 and x.shape[0] != 1:
            raise AssertionError("packed documents need one row")
        T = x.shape[1]
        pad = self.N * self.L - T
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
        return x.view(self.R, self.N, self.L, *x.shape[2:])

    def unchunk(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """(R, N, L, ...) -> (R, T, ...), dropping the padding."""
        return x.reshape(self.R, self.N * self.L, *x.shape[3:])[:, :T]

    def ends(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each non-empty document: (row, chunk, offset) of its last token."""
        last = self.last[self.ids]
        return self.row[self.ids], last // self.L, last % self.L
