"""Data for zoo: the byte tokenizer, the embedded default corpus, synthetic tasks, and packing with document
boundaries.

Where the text comes from (:mod:`zoo.data.corpus`, :mod:`zoo.data.synthetic`, or any ``datasets.Dataset``
with a text column), how it becomes ids (:mod:`zoo.data.tokenizer`), and how ids become fixed-length training
blocks that keep documents apart (:mod:`zoo.data.packing`).
"""

from zoo.data.corpus import default_corpus, default_corpus_dataset
from zoo.data.packing import (
    IGNORE_INDEX,
    DataCollatorForPacked,
    cu_seqlens_from_position_ids,
    document_mask_from_position_ids,
    make_packed_dataset,
    pack_documents,
)
from zoo.data.synthetic import (
    SYNTHETIC_TASKS,
    MarkovChain,
    markov_chain,
    synthetic_dataset,
    synthetic_documents,
)
from zoo.data.tokenizer import DEFAULT_VOCAB_SIZE, default_tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "IGNORE_INDEX",
    "SYNTHETIC_TASKS",
    "DataCollatorForPacked",
    "MarkovChain",
    "cu_seqlens_from_position_ids",
    "default_corpus",
    "default_corpus_dataset",
    "default_tokenizer",
    "document_mask_from_position_ids",
    "load_tokenizer",
    "make_packed_dataset",
    "markov_chain",
    "pack_documents",
    "synthetic_dataset",
    "synthetic_documents",
]
