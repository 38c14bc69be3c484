"""Passkey retrieval: a five-digit key hidden at a chosen depth in repetitive filler text.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers", 2023. The
variants are needle depths; the report draws the depth × length grid as a heatmap.
"""

from __future__ import annotations

import random

from eval.tasks.base import Sample, Task
from eval.tasks.text import filler_chars, haystack_prompt, passkey_filler

HEADER = "A pass key is hidden in the long text below. Find it and remember it; you will be asked for it.\n\n"
FOOTER = "\n\nWhat is the pass key? The pass key is"


class Passkey(Task):
    name = "passkey"
    metric = "string_match"
    variant_kind = "depth"
    paper = "Mohtashami & Jaggi, 2023"

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        key = str(rng.randint(10000, 99999))
        depth = float(variant)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        hay = passkey_filler(filler_chars(tokenizer, length))
        prompt, meta = haystack_prompt(tokenizer, length, HEADER, FOOTER, hay, [(depth, needle)], self.name)
        return Sample(prompt, [key], length, variant, metadata={**meta, "depth": depth})
