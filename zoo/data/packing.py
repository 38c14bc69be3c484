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

A block of ``one_per_block`` holds one document (or the rest of one) and then padding: it is a right-padded
sequence, not a packed row, and is written as one. It always carries the ``attention_mask`` row, and the padding
continues the positions of the document before it instead of restarting at 0, so that no model reads the padding
as a second packed document (RMT, say, runs packed documents one by one, a row at a time, where a padded batch
runs whole). The padding's labels are -100 and every model hides it through the mask, as in any padded batch, so
each document's logits and loss are those it has alone.

A loss on part of each document (the answer of a question, say) is a per-token ``loss_mask`` beside each
document's tokens: ``labels`` are -100 also wherever it is 0 (and on the bos / eos tokens added around the
document), and blocks left with no target at all are dropped, since they would train nothing. The mask travels with
the tokens whichever way the documents are laid out; but with documents end to end (``one_per_block=False``), or
one longer than a block, a question can land in a block without its context, so per-document packing of
documents that fit one block is what such a loss wants. :func:`make_packed_dataset` builds the masks from
character spans (``answer_only=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from zoo.modules.documents import cu_seqlens_from_position_ids, document_mask_from_position_ids

__all__ = [
    "ANSWER_COLUMNS",
    "IGNORE_INDEX",
    "DataCollatorForPacked",
    "answer_tokens",
    "cu_seqlens_from_position_ids",
    "document_mask_from_position_ids",
    "make_packed_dataset",
    "pack_documents",
]

IGNORE_INDEX = -100
# The character span of each document's answer, for make_packed_dataset(..., answer_only=True).
ANSWER_COLUMNS = ("answer_start", "answer_end")


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
    loss_masks: Iterable[Sequence[int]] | None = None,
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
            longer than a block still continues in the next). Its blocks always have an ``attention_mask`` row,
            and their padding continues the positions of the document before it.
        attention_mask: add an ``attention_mask`` row, 0 on padding.
        loss_masks: for each document, one 0/1 per token: labels only where it is 1; blocks with no label left
            are dropped. None: every token but a document's first is a target.

    Empty documents are skipped.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    prefix = [bos_token_id] if bos_token_id is not None else []
    suffix = [eos_token_id] if eos_token_id is not None else []
    docs = list(docs)
    if loss_masks is None:
        masks = [None] * len(docs)
    else:
        masks = list(loss_masks)
        if len(masks) != len(docs):
            raise ValueError(f"loss_masks has {len(masks)} entries for {len(docs)} documents")
        for i, (doc, mask) in enumerate(zip(docs, masks)):
            if len(mask) != len(doc):
                raise ValueError(
                    f"loss_masks[{i}] has {len(mask)} entries for a document of {len(doc)} tokens"
                )
    # per token of the block: whether it may be a target (None: all may)
    keep: list[int] | None = None if loss_masks is None else []

    blocks: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
    if attention_mask or one_per_block:
        blocks["attention_mask"] = []

    def pad_and_emit(ids: list[int], pos: list[int], keep: list[int] | None) -> None:
        real = len(ids)
        ids.extend([pad_token_id] * (block_size - real))
        # one document per block: the padding goes on from the document (a padded sequence, not a second
        # document); end to end, the last block's padding is a document of its own beside the others
        first = pos[-1] + 1 if one_per_block else 0
        pos.extend(range(first, first + block_size - real))
        _emit(blocks, ids, pos, keep, ignore_from=real)

    ids: list[int] = []
    pos: list[int] = []
    for doc, mask in zip(docs, masks):
        if len(doc) == 0:
            continue
        if one_per_block and ids:
            pad_and_emit(ids, pos, keep)
            ids, pos, keep = [], [], None if keep is None else []
        tokens = [*prefix, *doc, *suffix]
        targets = None if mask is None else [0] * len(prefix) + [int(m) for m in mask] + [0] * len(suffix)
        start = 0
        while start < len(tokens):
            # A document (or what is left of it) fills the block from here, counting positions from 0.
            take = min(len(tokens) - start, block_size - len(ids))
            ids.extend(tokens[start : start + take])
            pos.extend(range(take))
            if keep is not None:
                keep.extend(targets[start : start + take])
            start += take
            if len(ids) == block_size:
                _emit(blocks, ids, pos, keep)
                ids, pos, keep = [], [], None if keep is None else []
    if ids and not drop_last:
        pad_and_emit(ids, pos, keep)
    return blocks


def _emit(
    blocks: dict[str, list[list[int]]],
    ids: list[int],
    pos: list[int],
    keep: list[int] | None = None,
    ignore_from: int | None = None,
):
    labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, pos)]
    if ignore_from is not None:
        labels[ignore_from:] = [IGNORE_INDEX] * (len(labels) - ignore_from)
    if keep is not None:
        labels = [t if k else IGNORE_INDEX for t, k in zip(labels, keep + [0] * (len(labels) - len(keep)))]
        if all(t == IGNORE_INDEX for t in labels):
            return
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
    answer_only: bool = False,
):
    """Tokenise ``dataset[text_column]`` and pack it into blocks; a ``datasets.Dataset`` of
    ``input_ids`` / ``position_ids`` / ``labels``.

    Each document gets the tokenizer's eos token (and its bos token, when it has one distinct from eos).
    Packing runs per ``batch_size`` documents (and per worker with ``num_proc``), so each such batch ends with
    one padded block (or, with ``drop_last``, without it). ``one_per_block`` and ``attention_mask``: as in
    :func:`pack_documents` (``one_per_block`` blocks always have the ``attention_mask`` column).

    ``answer_only``: the loss is on each document's answer alone, the characters ``answer_start:answer_end`` of
    its text (two integer columns the dataset must have, as ``synthetic_dataset(..., answer_spans=True)``
    gives): labels are -100 on every other token (see :func:`answer_tokens`), and blocks without an answer token
    are dropped.
    """
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column={text_column!r} is not a column of the dataset: {dataset.column_names}"
        )
    missing = [c for c in ANSWER_COLUMNS if c not in dataset.column_names]
    if answer_only and missing:
        raise ValueError(
            f"answer_only needs the answer's character span in columns {ANSWER_COLUMNS}; the dataset lacks"
            f" {missing} (columns: {dataset.column_names})"
        )
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id != eos else None
    pad = tokenizer.pad_token_id

    def tokenize(batch):
        if answer_only:
            ids, masks = answer_tokens(tokenizer, batch[text_column], *(batch[c] for c in ANSWER_COLUMNS))
            return {"input_ids": ids, "loss_mask": masks}
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
            loss_masks=batch["loss_mask"] if answer_only else None,
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


def answer_tokens(
    tokenizer, texts: Sequence[str], starts: Sequence, ends: Sequence
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each text, and a 0/1 mask per token: 1 on the tokens of the characters ``start:end``.

    A text's ``start`` and ``end`` are integers (one answer) or equally long lists of them (several answers, in
    order, not overlapping: ``babi_drill``); every span is marked.

    A fast tokenizer tokenises each text whole and marks the tokens whose characters overlap a span (its
    offsets), so the ids are those of plain tokenisation. A slow one (zoo's byte tokenizer) has no offsets:
    the text between and inside the spans is tokenised piece by piece and joined, which for a byte or
    character tokenizer is again plain tokenisation.
    """
    spans = []
    for i, (text, start, end) in enumerate(zip(texts, starts, ends)):
        several = isinstance(start, (list, tuple))
        pairs = list(zip(start, end)) if several else [(start, end)]
        if several and (not isinstance(end, (list, tuple)) or len(start) != len(end) or not pairs):
            raise ValueError(f"document {i}: answer starts {start!r} and ends {end!r} are not two equally long lists")
        previous = 0
        for s, e in pairs:
            if not previous <= s < e <= len(text):
                raise ValueError(
                    f"answer span {s}:{e} of document {i} is not a non-empty span of its {len(text)} characters"
                    + (" after the previous span" if previous else "")
                )
            previous = e
        spans.append(pairs)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        masks = [
            [int(any(a < e and b > s for s, e in pairs)) for a, b in offsets]
            for offsets, pairs in zip(enc["offset_mapping"], spans)
        ]
        return enc["input_ids"], masks

    ids, masks = [], []
    for text, pairs in zip(texts, spans):
        cuts = [0, *(c for pair in pairs for c in pair), len(text)]
        pieces = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        ids.append([t for piece in encoded for t in piece])
        masks.append([j % 2 for j, piece in enumerate(encoded) for _ in piece])
    return ids, masks


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
