"""Perplexity against context length on held-out real text: the curve that shows whether a model extrapolates.

Each sample is a window of ``length`` tokens of the embedded corpus's test split; only its last part (the variant
``last<N>``, N = min(256, length // 4) tokens) is scored, so every length is judged on the same kind of tokens and
only the amount of preceding context changes (the bucketed protocol of e.g. Press et al., 2022, ALiBi, and
Peng et al., 2023, YaRN). A flat or falling curve past the training length means the model extrapolates.
"""

from __future__ import annotations

import random

from eval.tasks.base import CellSkipped, Sample, Task, decode, encode
from eval.tasks.text import real_text_documents

MAX_SCORED_TOKENS = 256


def scored_tokens(length: int) -> int:
    return max(1, min(MAX_SCORED_TOKENS, length // 4))


class Perplexity(Task):
    name = "perplexity"
    metric = "perplexity"
    paper = "held-out text of the embedded corpus"
    uses_real_text = True

    def __init__(self) -> None:
        self._streams: dict[int, list[int]] = {}

    def variants(self, length: int, depths: list[float]) -> list[str]:
        return [f"last{scored_tokens(length)}"]

    def stream(self, tokenizer) -> list[int]:
        """The test documents, in their fixed order, as one token stream (cached per tokenizer)."""
        key = id(tokenizer)
        if key not in self._streams:
            self._streams[key] = encode(tokenizer, "\n\n".join(real_text_documents()))
        return self._streams[key]

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        ids = self.stream(tokenizer)
        if len(ids) < length:
            raise CellSkipped(f"the held-out corpus has {len(ids)} tokens, fewer than length={length}")
        tail = scored_tokens(length)
        start = rng.randint(0, len(ids) - length)
        context, continuation = (
            ids[start : start + length - tail],
            ids[start + length - tail : start + length],
        )
        meta = {"start": start, "scored_tokens": tail}
        return Sample(
            decode(tokenizer, context), [decode(tokenizer, continuation)], length, variant, metadata=meta
        )
