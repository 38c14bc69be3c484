"""Passkey retrieval: a five-digit key hidden at a chosen depth in repetitive filler text.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers", 2023. The
variants are needle depths; the report draws the depth × length grid as a heatmap.

A cell averages over needle positions, not over keys at one position: each sample starts the filler at a random
one of its words and, inside the haystack, draws the needle's depth within ``DEPTH_JITTER`` of the cell's
(the ends, 0 and 1, stay exact). With one fixed filler every sample of a cell would put the needle at the same
token, and a model whose recall depends on where the key falls (a segment-recurrent one, relative to its segment
boundaries) would be scored on that one place: a trained RMT scored 94% on the five default depths at 2048 tokens,
and 65% over 101 depths.
"""

from __future__ import annotations

import random

from eval.tasks.base import Sample, Task, count_tokens
from eval.tasks.text import PASSKEY_WORDS, filler_chars, haystack_prompt, passkey_filler

HEADER = "A pass key is hidden in the long text below. Find it and remember it; you will be asked for it.\n\n"
FOOTER = "\n\nWhat is the pass key? The pass key is"
# an interior needle's depth lies within this share of the haystack of its cell's depth
DEPTH_JITTER = 0.025


class Passkey(Task):
    name = "passkey"
    metric = "string_match"
    variant_kind = "depth"
    paper = "Mohtashami & Jaggi, 2023"
    revision = 2  # 1: one fixed filler, every sample of a cell at the same place

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        key = str(rng.randint(10000, 99999))
        depth = float(variant)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        at = depth
        if 0.0 < depth < 1.0:
            at = min(1.0, max(0.0, depth + rng.uniform(-DEPTH_JITTER, DEPTH_JITTER)))
        chars = filler_chars(tokenizer, length)
        # the filler's phase, the first (in a drawn order) whose prompt is exactly `length` tokens: a haystack cut
        # after a space loses it (prompts do not end their haystack with one), which can leave a prompt one short
        phases = list(range(len(PASSKEY_WORDS)))
        rng.shuffle(phases)
        best = None
        for phase in phases:
            hay = passkey_filler(chars, start=phase)
            prompt, meta = haystack_prompt(tokenizer, length, HEADER, FOOTER, hay, [(at, needle)], self.name)
            tokens = count_tokens(tokenizer, prompt)
            if best is None or tokens > best[0]:
                best = (tokens, prompt, meta)
            if tokens == length:
                break
        _, prompt, meta = best
        return Sample(prompt, [key], length, variant, metadata={**meta, "depth": depth})
