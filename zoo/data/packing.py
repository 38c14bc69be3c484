"""Packing tokenised documents into fixed-length blocks that remember where each document starts.

Documents are laid end to end (``[bos] + tokens + [eos]`` each) and cut into blocks of ``block_size`` tokens.
Each block carries three rows of equal length:

- ``input_ids``: the tokens;
- ``position_ids``: the position of each token inside its document, 0 at every document start. A document cut
  by a block boundary starts again at 0 at the start of the next block: within a block, position 0 is exactly
  where a new document (or the rest of one) begins, so every block stands alone and can be shuffled freely;
- ``labels``: ``input_ids`` with -100 wherever ``position_ids == 0``. Models shift labels by one inside
  (transformers' convention), so the first token of a document is never predicted from the previous one.

Models that support packed sequences read the boundaries from ``position_ids`` (``zoo.modules.documents``, one
rule for every consumer): :func:`cu_seqlens_from_position_ids` gives the ``cu_seqlens`` of fla and flash-attn's varlen kernels,
:func:`document_mask_from_position_ids` a dense block-diagonal causal mask. A last, incomplete block is padded
with ``pad_token_id`` (labels -100, positions counting from 0 as a document of its own) unless ``drop_last``.

Two options: ``one_per_block`` starts every document in a new block, padding the rest of the one before (for
question-answer documents whose question must stay with its context, as ``synthetic:passkey``); and
``attention_mask`` adds a fourth row, 0 on padding and 1 elsewhere (for encoders, which read the whole block).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from zoo.modules.documents import cu_seqlens_from_position_ids, document_mask_from_position_ids

__all__ = [
    "IGNORE_INDEX",
    "DataCollatorForPacked",
    "cu_seqlens_from_position_ids",
    "document_mask_from_position_ids",
    "make_packed_dataset",
    "pack_documents",
]

IGNORE_INDEX = -100


def pack_documents(
    docs: Iterable[Sequence[int]],
    block_size: int,
    eos_token_id: int | None,
    bos_token_id: int | None = None,
    drop_last: bool = False,
    *,
    pad_token_id: int | None = None,
    one_per_block: bool = False,
    attention_mask: bool = False,
) -> dict[str, list[list[int]]]:
    """Pack token lists into blocks of ``block_size`` with ``input_ids``, ``position_ids`` and ``labels``.

    Args:
        docs: token ids of each document, without special tokens.
        block_size: length of every block.
        eos_token_id: appended to each document; None appends nothing.
        bos_token_id: prepended to each document; None prepends nothing.
        drop_last: drop the last, incomplete block instead of padding it.
        pad_token_id: fills the last block; defaults to ``eos_token_id``, else 0.
        one_per_block: start each document in a new block, padding the rest of the current one (a document
            longer than a block still continues in the next).
        attention_mask: add an ``attention_mask`` row, 0 on padding.

    Empty documents are skipped.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    prefix = [bos_token_id] if bos_token_id is not None else []
    suffix = [eos_token_id] if eos_token_id is not None else []

    blocks: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
    if attention_mask:
        blocks["attention_mask"] = []

    def pad_and_emit(ids: list[int], pos: list[int]) -> None:
        real = len(ids)
        ids.extend([pad_token_id] * (block_size - real))
        pos.extend(range(block_size - real))
        _emit(blocks, ids, pos, ignore_from=real)

    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        if len(doc) == 0:
            continue
        if one_per_block and ids:
            pad_and_emit(ids, pos)
            ids, pos = [], []
        tokens = [*prefix, *doc, *suffix]
        start = 0
        while start < len(tokens):
            # A document (or what is left of it) fills the block from here, counting positions from 0.
            take = min(len(tokens) - start, block_size - len(ids))
            ids.extend(tokens[start : start + take])
            pos.extend(range(take))
            start += take
            if len(ids) == block_size:
                _emit(blocks, ids, pos)
                ids, pos = [], []
    if ids and not drop_last:
        pad_and_emit(ids, pos)
    return blocks


def _emit(blocks: dict[str, list[list[int]]], ids: list[int], pos: list[int], ignore_from: int | None = None):
    labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, pos)]
    if ignore_from is not None:
        labels[ignore_from:] = [IGNORE_INDEX] * (len(labels) - ignore_from)
    blocks["input_ids"].append(ids)
    blocks["position_ids"].append(pos)
    blocks["labels"].append(labels)
    if "attention_mask" in blocks:
        real = len(ids) if ignore_from is None else ignore_from
        blocks["attention_mask"].append([1] * real + [0] * (len(ids) - real))


def make_packed_dataset(
    dataset,
    tokenizer,
    block_size: int,
    text_column: str = "text",
    num_proc: int = 1,
    *,
    drop_last: bool = False,
    batch_size: int = 1000,
    one_per_block: bool = False,
    attention_mask: bool = False,
):
    """Tokenise ``dataset[text_column]`` and pack it into blocks; a ``datasets.Dataset`` of
    ``input_ids`` / ``position_ids`` / ``labels``.

    Each document gets the tokenizer's eos token (and its bos token, when it has one distinct from eos).
    Packing runs per ``batch_size`` documents (and per worker with ``num_proc``), so each such batch ends with
    one padded block (or, with ``drop_last``, without it). ``one_per_block`` and ``attention_mask``: as in
    :func:`pack_documents`.
    """
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column={text_column!r} is not a column of the dataset: {dataset.column_names}"
        )
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id != eos else None
    pad = tokenizer.pad_token_id

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]}

    def pack(batch):
        return pack_documents(
            batch["input_ids"],
            block_size,
            eos,
            bos,
            drop_last,
            pad_token_id=pad,
            one_per_block=one_per_block,
            attention_mask=attention_mask,
        )

    num_proc = num_proc if num_proc and num_proc > 1 else None
    tokenized = dataset.map(
        tokenize,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc="Tokenizing",
    )
    return tokenized.map(
        pack,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=tokenized.column_names,
        desc=f"Packing into blocks of {block_size}",
    )


class DataCollatorForPacked:
    """Stacks packed examples into ``[B, block_size]`` LongTensors: input_ids, position_ids, labels (and
    attention_mask when the examples have one)."""

    keys = ("input_ids", "position_ids", "labels", "attention_mask")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollatorForPacked got an empty batch")
        return {
            key: torch.stack([torch.as_tensor(f[key], dtype=torch.long) for f in features])
            for key in self.keys
            if key in features[0]
        }
