"""Packed documents: where each document of a packed batch starts, read from ``position_ids``.

A packed row holds several documents back to back; their ``position_ids`` restart at 0 where each one starts
(``zoo.data.packing`` writes them that way). Every consumer (the attention mask, the ``cu_seqlens`` of the
recurrent ops, the data collator's checks) derives the boundaries here, from one rule: a document starts where
the position is 0 and at the first column of every row, so that no document spans two rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def document_starts(position_ids: torch.Tensor) -> torch.BoolTensor:
    """Bool ``(B, T)``: True where a document starts. A ``(T,)`` input is taken as one row."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (B, T) or (T,), got shape {tuple(position_ids.shape)}")
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


def document_ids(position_ids: torch.Tensor) -> torch.LongTensor:
    """``(B, T)`` document index of each token within its row (1 for the first document)."""
    return document_starts(position_ids).long().cumsum(-1)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.LongTensor:
    """Cumulative document lengths over the flattened batch, as fla's and flash-attn's ``cu_seqlens``.

    For ``[[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]`` it is ``[0, 3, 5, 7, 10]``.
    """
    starts = document_starts(position_ids).flatten()  # (B * T,)
    idx = starts.nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([starts.numel()])])


def document_mask_from_position_ids(position_ids: torch.Tensor) -> torch.BoolTensor:
    """Bool ``(B, T, T)``: True where query ``i`` may attend to key ``j`` (same document and ``j <= i``)."""
    doc = document_ids(position_ids)
    T = doc.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


@dataclass
class PackedDocuments:
    """The documents of a ``(B, T)`` batch flattened to one row, as the recurrent ops take them.

    ``cu_seqlens`` ``(N + 1,)`` are the boundaries of the N documents; ``last`` ``(B,)`` the index of each row's
    last document, whose final state is the row's state when decoding continues after a packed prefill.
    """

    cu_seqlens: torch.LongTensor
    last: torch.LongTensor

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> PackedDocuments:
        per_row = document_starts(position_ids).sum(-1)  # (B,)
        return cls(cu_seqlens_from_position_ids(position_ids), per_row.cumsum(0) - 1)

    def row_states(self, states: torch.Tensor) -> torch.Tensor:
        """Per-document final states ``(N, ...)`` -> the state each row ends with ``(B, ...)``."""
        return states[self.last]


def has_several_documents(position_ids: torch.Tensor | None) -> bool:
    """Whether some row restarts its positions after its first column (a data-dependent read)."""
    return position_ids is not None and position_ids.shape[-1] > 1 and bool((position_ids[:, 1:] == 0).any())
