"""Synthetic recall tasks in text form: multi-query associative recall (MQAR) and selective copying.

- ``mqar``: Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models", 2023. The whole
  context is key-value pairs (``kabe:4821``), so the number of pairs grows with the context length; the prompt
  ends by asking for the values of ``q`` keys (variants ``q1``, ``q4``); every value must be returned.
- ``selective_copy``: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023 (after
  the copying tasks of Arjovsky et al., 2016). ``k`` words (variants ``n4``, ``n16``) are scattered among noise
  dashes; the answer is the words in their order.
"""

from __future__ import annotations

import random

from eval.tasks.base import CellSkipped, Sample, Task, count_tokens, fit_to_length, top_up
from eval.tasks.text import NOUNS, pseudo_words


class MultiQueryAssociativeRecall(Task):
    name = "mqar"
    metric = "string_match"
    paper = "Arora et al., 2023 (Zoology)"
    header = "Each key below is followed by its value. Remember them.\n"

    def variants(self, length: int, depths: list[float]) -> list[str]:
        return ["q1", "q4"]

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        num_queries = int(variant.removeprefix("q"))
        seed = rng.getrandbits(64)
        probe = pseudo_words(random.Random(seed), 40)
        per_pair = count_tokens(tokenizer, " ".join(f"{w}:{1000 + i}" for i, w in enumerate(probe))) / 40
        capacity = int(length / per_pair) + 16
        keys = pseudo_words(random.Random(seed), capacity)
        digits = 4 if capacity < 8000 else 6
        values = [str(v) for v in random.Random(seed).sample(range(10 ** (digits - 1), 10**digits), capacity)]

        def queried(n: int) -> list[int]:
            return random.Random(seed).sample(range(n), min(n, num_queries))

        def build(n: int, longer: int = 0) -> str:
            # the first `longer` keys get an "x" (no pseudo-word has one): a one-letter length step
            pairs = " ".join(
                f"{k}{'x' if i < longer else ''}:{v}" for i, (k, v) in enumerate(zip(keys, values[:n]))
            )
            asked = " ".join(keys[i] + ("x" if i < longer else "") for i in queried(n))
            return f"{self.header}{pairs}\nLook up the values of: {asked}\nValues:"

        n, _ = fit_to_length(tokenizer, length, build, guess=int(length / per_pair) - 8, name=self.name)
        if n < num_queries:
            raise CellSkipped(f"length={length} is too short for {self.name}: only {n} key-value pairs fit")
        m, prompt = top_up(tokenizer, length, lambda m: build(n, m), limit=n)
        asked = queried(n)
        answers = [values[i] for i in asked]
        query_keys = [keys[i] + ("x" if i < m else "") for i in asked]
        return Sample(prompt, answers, length, variant, metadata={"num_pairs": n, "queries": query_keys})


class SelectiveCopying(Task):
    name = "selective_copy"
    metric = "string_match"
    paper = "Gu & Dao, 2023 (Mamba)"
    header = "Copy the words hidden among the dashes, in the order they appear.\n"
    footer = "\nThe words, in order:"

    def variants(self, length: int, depths: list[float]) -> list[str]:
        return ["n4", "n16"]

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        k = int(variant.removeprefix("n"))
        words = rng.choices(NOUNS, k=k)
        seed = rng.getrandbits(64)

        def build(n: int) -> str:
            slots = sorted(random.Random(seed).sample(range(n + k), k))
            sequence = ["-"] * (n + k)
            for slot, word in zip(slots, words):
                sequence[slot] = word
            return self.header + " ".join(sequence) + self.footer

        per_dash = count_tokens(tokenizer, "- " * 64) / 64
        guess = int((length - count_tokens(tokenizer, build(0))) / per_dash)
        n, prompt = fit_to_length(tokenizer, length, build, guess=guess, name=self.name)
        return Sample(prompt, [" ".join(words)], length, variant, metadata={"num_noise": n, "words": words})
