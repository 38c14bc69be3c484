"""RULER-style synthetic tasks: needle-in-a-haystack variants, variable tracking, common/frequent-word extraction.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", 2024. Our own wording and
generators, after the paper's task design:

- ``niah_{single,multikey,multivalue,multiquery}_{noise,essay}``: "secret code" needles in a haystack of either
  meaningless generated sentences (noise) or real text (essay, the embedded corpus). multikey adds needles with
  other keys as distractors, multivalue hides several codes for one key (all must be returned), multiquery asks
  for the codes of several keys. The first (target) needle sits at the variant's depth, the others at random
  depths.
- ``vt``: a chain of variable assignments (``VAR ABCDE = 12345.``, ``VAR FGHIJ = VAR ABCDE.``) plus a distractor
  chain, hidden in noise; every variable holding the value must be named. Variants ``h2``/``h4`` are the hops.
- ``cwe``: a numbered word list where a few words repeat far more often than the rest; name the most common.
- ``fwe``: a "coded" text of pseudo-words with Zipf-distributed counts; name the three most frequent.
"""

from __future__ import annotations

import random

from eval.tasks.base import Sample, Task, count_tokens, fit_to_length, top_up
from eval.tasks.text import (
    ADJECTIVES,
    NOUNS,
    filler_chars,
    haystack_prompt,
    noise_sentences,
    pseudo_words,
    real_text,
)

NIAH_KINDS = ("single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("noise", "essay")
# Needles per sample of the multi-needle kinds (RULER uses four).
NUM_NEEDLES = 4

NIAH_HEADER = "Some secret codes are hidden in the text below. Memorise them; you will be asked about them afterwards.\n\n"


def _haystack_text(kind: str, tokenizer, length: int, rng: random.Random) -> str:
    chars = filler_chars(tokenizer, length)
    return noise_sentences(rng, chars) if kind == "noise" else real_text(rng, chars)


class NeedleInAHaystack(Task):
    metric = "string_match"
    variant_kind = "depth"
    paper = "Hsieh et al., 2024 (RULER)"

    def __init__(self, kind: str, haystack: str):
        if kind not in NIAH_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {NIAH_KINDS}")
        if haystack not in HAYSTACKS:
            raise ValueError(f"haystack={haystack!r} is not one of {HAYSTACKS}")
        self.kind, self.haystack = kind, haystack
        self.uses_real_text = haystack != "noise"
        self.name = f"niah_{kind}_{haystack}"

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        depth = float(variant)
        many = 1 if self.kind == "single" else NUM_NEEDLES
        adjectives = rng.sample(ADJECTIVES, many)
        keys = [f"{adj}-{noun}" for adj, noun in zip(adjectives, rng.sample(NOUNS, many))]
        values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), many)]
        if self.kind == "multivalue":
            keys = [keys[0]] * many
        needles = [f"The secret code of the {key} is {value}." for key, value in zip(keys, values)]
        depths = [depth] + [rng.random() for _ in range(many - 1)]

        if self.kind in ("single", "multikey"):
            question, answers = f"What is the secret code of the {keys[0]}?", values[:1]
            prefix = f"The secret code of the {keys[0]} is"
        elif self.kind == "multivalue":
            question = f"What are all the secret codes of the {keys[0]}?"
            prefix, answers = f"The secret codes of the {keys[0]} are", values
        else:
            listed = ", ".join(f"the {k}" for k in keys[:-1]) + f" and the {keys[-1]}"
            question, prefix, answers = (
                f"What are the secret codes of {listed}?",
                "The secret codes are",
                values,
            )
        footer = f"\n\nQuestion: {question}\nAnswer: {prefix}"
        hay = _haystack_text(self.haystack, tokenizer, length, rng)
        prompt, meta = haystack_prompt(
            tokenizer, length, NIAH_HEADER, footer, hay, list(zip(depths, needles)), self.name
        )
        return Sample(prompt, answers, length, variant, metadata={**meta, "depth": depth, "keys": keys})


class VariableTracking(Task):
    name = "vt"
    metric = "string_match"
    paper = "Hsieh et al., 2024 (RULER)"

    def variants(self, length: int, depths: list[float]) -> list[str]:
        return ["h2", "h4"]

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        hops = int(variant.removeprefix("h"))
        names = _variable_names(rng, 2 * (hops + 1))
        value, other = (str(v) for v in rng.sample(range(10_000, 100_000), 2))
        needles: list[tuple[float, str]] = []
        for chain, start in ((names[: hops + 1], value), (names[hops + 1 :], other)):
            statements = [f"VAR {chain[0]} = {start}."] + [
                f"VAR {b} = VAR {a}." for a, b in zip(chain[:-1], chain[1:])
            ]
            needles += list(zip(sorted(rng.random() for _ in statements), statements))
        header = "Memorise the variable assignments hidden in the text below.\n\n"
        footer = (
            f"\n\nQuestion: Which variables hold the value {value}, directly or through other variables?\n"
            f"Answer: The variables holding {value} are:"
        )
        hay = _haystack_text("noise", tokenizer, length, rng)
        prompt, meta = haystack_prompt(tokenizer, length, header, footer, hay, needles, self.name)
        return Sample(prompt, names[: hops + 1], length, variant, metadata={**meta, "value": value})


def _variable_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


class CommonWordsExtraction(Task):
    name = "cwe"
    metric = "string_match"
    paper = "Hsieh et al., 2024 (RULER)"
    header = "Below is a numbered list of words. Some words appear much more often than the others.\n"

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        seed = rng.getrandbits(64)
        probe = pseudo_words(random.Random(seed), 40)
        per_entry = count_tokens(tokenizer, " ".join(f"{i}. {w}" for i, w in enumerate(probe, 100))) / 40
        budget = max(1, int((length - 60) / per_entry))
        num_common = 10 if budget >= 150 else 5
        freq_common = min(30, max(2, budget // (3 * num_common)))
        freq_rare = 3 if freq_common >= 20 else 1
        words = pseudo_words(random.Random(seed), num_common + budget)
        common, rare = words[:num_common], words[num_common:]
        footer = (
            f"\nQuestion: What are the {num_common} most common words in the list above?\n"
            f"Answer: The {num_common} most common words are:"
        )

        def build(n: int, longer: int = 0) -> str:
            # the first `longer` rare words get an "x" (a letter no pseudo-word has): a one-letter length step
            kept = [w + "x" if i < longer else w for i, w in enumerate(rare[:n])]
            entries = common * freq_common + kept * freq_rare
            random.Random(seed).shuffle(entries)
            return self.header + " ".join(f"{i}. {w}" for i, w in enumerate(entries, 1)) + footer

        guess = max(0, budget - num_common * freq_common) // freq_rare
        n, _ = fit_to_length(tokenizer, length, build, guess=guess, name=self.name)
        _, prompt = top_up(tokenizer, length, lambda m: build(n, m), limit=n)
        meta = {"freq_common": freq_common, "freq_rare": freq_rare, "num_rare": n}
        return Sample(prompt, list(common), length, variant, metadata=meta)


def zipf_counts(total: int) -> list[int]:
    """Word counts falling as 1/rank² (Zipf, exponent 2), then singletons up to ``total`` words.

    The top three counts are forced strictly above every other count, so that the answer is well defined.
    """
    head = total / 3
    counts = [c for c in (int(head / k**2) for k in range(1, 1000)) if c >= 2]
    top, rest = (counts + [0, 0, 0])[:3], counts[3:]
    top[2] = max(top[2], max(rest, default=1) + 1)
    top[1] = max(top[1], top[2] + 1)
    top[0] = max(top[0], top[1] + 1)
    counts = top + rest
    return counts + [1] * max(0, total - sum(counts))


class FrequentWordsExtraction(Task):
    name = "fwe"
    metric = "string_match"
    paper = "Hsieh et al., 2024 (RULER)"
    header = "Read the coded text below and keep track of how often each coded word appears.\n"
    footer = (
        "\nQuestion: What are the three most frequent coded words in the text above?\n"
        "Answer: The three most frequent coded words are:"
    )

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        seed = rng.getrandbits(64)
        probe = pseudo_words(random.Random(seed), 40)
        per_word = count_tokens(tokenizer, " ".join(probe)) / 40
        vocabulary = pseudo_words(random.Random(seed), int(length / per_word) + 16)

        def build(n: int, longer: int = 0) -> str:
            counts = zipf_counts(n)
            # the last `longer` words (singletons) get an "x", a letter no pseudo-word has: a one-letter step
            words = [
                w + "x" if i >= len(counts) - longer else w for i, w in enumerate(vocabulary[: len(counts)])
            ]
            text = [w for w, c in zip(words, counts) for _ in range(c)]
            random.Random(seed).shuffle(text)
            return self.header + " ".join(text) + self.footer

        guess = int((length - count_tokens(tokenizer, self.header + self.footer)) / per_word)
        n, _ = fit_to_length(tokenizer, length, build, guess=guess, name=self.name)
        singletons = sum(1 for c in zipf_counts(n) if c == 1)
        _, prompt = top_up(tokenizer, length, lambda m: build(n, m), limit=singletons)
        return Sample(prompt, vocabulary[:3], length, variant, metadata={"counts": zipf_counts(n)[:4]})
