"""Tokenizers: the byte-level default that needs no download, and loading any other by name or path.

The default is transformers' ``ByT5Tokenizer`` with no sentinel ids: 259 ids, ``<pad>`` = 0, ``</s>`` = 1,
``<unk>`` = 2, then the 256 byte values at 3..258. It is built in code, so nothing is fetched, and a model
saved with it reloads its tokenizer with plain ``AutoTokenizer.from_pretrained(path)``, without importing zoo.
``split_special_tokens=True`` makes the text ``"</s>"`` encode as its five bytes rather than as the
end-of-sequence id, so every UTF-8 string encodes and decodes back to itself exactly.
"""

from __future__ import annotations

import logging

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# len(default_tokenizer()): 3 special tokens + 256 bytes; checked by the tests.
DEFAULT_VOCAB_SIZE = 259
DEFAULT_TOKENIZER_NAMES = (None, "", "byte", "bytes", "byt5")


def default_tokenizer() -> ByT5Tokenizer:
    """The byte-level tokenizer: ids 0/1/2 are pad/eos/unk, byte ``b`` is id ``b + 3``."""
    return ByT5Tokenizer(extra_ids=0, split_special_tokens=True)


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """The byte tokenizer for ``None`` or ``"byte"``, else ``AutoTokenizer.from_pretrained(name_or_path)``.

    The tokenizer returned always has a pad token: when it has none, its eos (or unk) token pads.
    """
    if name_or_path in DEFAULT_TOKENIZER_NAMES:
        return default_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:
        raise OSError(
            f"Could not load a tokenizer from {name_or_path!r}: {err}. Pass a local folder saved with "
            "save_pretrained (or a Hub id already in the local cache), or 'byte' for the built-in byte "
            "tokenizer."
        ) from err
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"The tokenizer at {name_or_path!r} has no pad, eos or unk token to pad with; "
                "add a pad token to it (tokenizer.add_special_tokens({'pad_token': ...})) and save it again."
            )
        logger.info("Tokenizer %r has no pad token; padding with %r", name_or_path, fallback)
        tokenizer.pad_token = fallback
    return tokenizer
