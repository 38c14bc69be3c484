"""Raw material of the task generators: word lists, pseudo-words, filler sentences, real text, and needle insertion.

Real text comes from zoo's embedded corpus (``zoo.data.corpus.default_corpus("test")``, documents no model trained
on), and from nowhere else: a failure of the corpus (a broken cache, an empty split) is an error, since another
text would silently change what the scores mean. :func:`real_text_corpus` identifies the documents read (name,
count, digest); the runner records it in results.json and the report shows it.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re

from eval.tasks.base import decode, encode, fit_to_length

NOUNS = (
    "apple", "anchor", "badger", "banjo", "barrel", "beacon", "bridge", "candle", "canyon", "castle", "cedar",
    "comet", "copper", "dolphin", "engine", "falcon", "feather", "forest", "garden", "glacier", "harbor", "hammer",
    "island", "jacket", "kettle", "ladder", "lantern", "lemon", "magnet", "marble", "meadow", "mirror", "needle",
    "orchard", "otter", "pebble", "pepper", "piano", "planet", "quartz", "rabbit", "ribbon", "river", "rocket",
    "saddle", "salmon", "shadow", "silver", "spider", "summit", "tiger", "timber", "tunnel", "violin", "walnut",
    "window", "willow", "wizard", "yacht", "zebra",
)  # fmt: skip
ADJECTIVES = (
    "amber", "bold", "brave", "bright", "calm", "clever", "crimson", "dusty", "eager", "fancy", "gentle", "golden",
    "hidden", "humble", "icy", "jolly", "lively", "lucky", "misty", "noble", "odd", "proud", "quiet", "rapid",
    "rusty", "shy", "silent", "swift", "tidy", "vivid", "wild", "young",
)  # fmt: skip
VERBS = ("rests", "waits", "sleeps", "shines", "drifts", "stands", "wanders", "hums", "glows", "lingers")
PLACES = ("near the hill", "by the lake", "in the valley", "under the bridge", "on the road", "at the market",
          "behind the barn", "across the field", "beside the well", "along the shore")  # fmt: skip

# Filler of the passkey test: the same few plain sentences over and over (Mohtashami & Jaggi, 2023).
PASSKEY_FILLER = "The morning is bright. The road goes on. The birds sing in the trees. We walk and we rest. "

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_words(rng: random.Random, n: int, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``n`` distinct pronounceable non-words ("kabero"), none of them an English word of the lists above."""
    taken = set(NOUNS) | set(ADJECTIVES)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(k))
        if word not in seen and word not in taken:
            seen.add(word)
            words.append(word)
    return words


def noise_sentences(rng: random.Random, min_chars: int) -> str:
    """Grammatical but meaningless sentences ("The quiet otter waits by the lake."), at least ``min_chars`` long."""
    parts: list[str] = []
    total = 0
    while total < min_chars:
        sentence = (
            f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} {rng.choice(PLACES)}."
        )
        parts.append(sentence)
        total += len(sentence) + 1
    return " ".join(parts)


PASSKEY_WORDS = tuple(PASSKEY_FILLER.split())


def passkey_filler(min_chars: int, start: int = 0) -> str:
    """At least ``min_chars`` characters of the passkey filler, its cycle read from its word ``start`` (of
    ``PASSKEY_WORDS``): the same text, with its sentence boundaries moved, so that a sample can place its needle
    elsewhere relative to the tokens before it."""
    if not 0 <= start < len(PASSKEY_WORDS):
        raise ValueError(f"start must be a word of the filler, 0..{len(PASSKEY_WORDS) - 1}, got {start}")
    cycle = " ".join(PASSKEY_WORDS[start:] + PASSKEY_WORDS[:start]) + " "
    return cycle * (min_chars // len(cycle) + 1)


ZOO_CORPUS = "zoo.data.corpus:test"


@functools.lru_cache(maxsize=2)
def _real_text(split: str = "test") -> tuple[str, ...]:
    from zoo.data.corpus import default_corpus

    documents = tuple(default_corpus(split))
    if not documents:
        raise RuntimeError(
            f"zoo.data.corpus: the {split} split of the default corpus is empty; delete its cache"
            " ($ZOO_CACHE/corpus, default ~/.cache/zoo/corpus) to rebuild it"
        )
    return documents


def real_text_documents(split: str = "test") -> tuple[str, ...]:
    """Held-out real English documents: zoo's corpus test split (see :func:`real_text_corpus`). ``split="train"``
    gives the documents models train on (``synthetic:babi_suite``'s filler), never what the suite scores."""
    return _real_text(split)


def real_text_corpus() -> dict:
    """Which documents :func:`real_text_documents` reads: ``{"name", "documents", "sha256"}``, the digest over
    the documents in order, so that two runs scored on different text are told apart."""
    documents = _real_text()
    digest = hashlib.sha256("\x00".join(documents).encode()).hexdigest()
    return {"name": ZOO_CORPUS, "documents": len(documents), "sha256": digest[:16]}


def real_text(rng: random.Random, min_chars: int) -> str:
    """Real documents in a seeded order, whitespace collapsed, repeated if the corpus is shorter than asked."""
    documents = [re.sub(r"\s+", " ", doc).strip() for doc in real_text_documents()]
    documents = [doc for doc in documents if doc]
    parts: list[str] = []
    total = 0
    while total < min_chars:
        order = list(range(len(documents)))
        rng.shuffle(order)
        for i in order:
            parts.append(documents[i])
            total += len(documents[i]) + 1
            if total >= min_chars:
                break
    return " ".join(parts)


def filler_chars(tokenizer, target_tokens: int) -> int:
    """Characters of English filler enough for ``target_tokens`` tokens, with margin (from a measured ratio)."""
    probe = PASSKEY_FILLER * 8
    chars_per_token = len(probe) / max(1, len(encode(tokenizer, probe)))
    return int(target_tokens * max(chars_per_token, 1.0) * 1.5) + 256


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def insert_needles(tokenizer, hay_ids: list[int], n: int, needles: list[tuple[float, str]]) -> str:
    """The first ``n`` haystack tokens as text, each needle inserted at the sentence boundary nearest its depth.

    Depth is the fraction of the haystack before the needle (0 = first, 1 = last), measured in characters, which
    track tokens closely in homogeneous filler and are one decode cheaper per needle. The boundary is a sentence
    end when one lies close (within 2% of the text); otherwise the nearest space.
    """
    text = decode(tokenizer, hay_ids[:n])
    sentence_bounds = [0, *(m.end() for m in _SENTENCE_END.finditer(text)), len(text)]
    word_bounds = [0, *(m.end() for m in re.finditer(r"\s+", text)), len(text)]
    slack = max(40, len(text) // 50)
    placed: list[tuple[int, int, str]] = []
    for order, (depth, needle) in enumerate(needles):
        char_target = round(depth * len(text))
        best = min(sentence_bounds, key=lambda b: abs(b - char_target))
        if abs(best - char_target) > slack:
            best = min(word_bounds, key=lambda b: abs(b - char_target))
        placed.append((best, order, needle))
    pieces, previous = [], 0
    for pos, _, needle in sorted(placed):
        space = "" if pos == 0 or text[pos - 1].isspace() else " "
        pieces += [text[previous:pos], f"{space}{needle} "]
        previous = pos
    pieces.append(text[previous:])
    return "".join(pieces).rstrip()


def haystack_prompt(
    tokenizer,
    length: int,
    header: str,
    footer: str,
    hay_text: str,
    needles: list[tuple[float, str]],
    name: str,
) -> tuple[str, dict]:
    """``header + haystack-with-needles + footer`` at ``length`` tokens, and metadata locating the pieces.

    The haystack is cut at a token boundary so that the prompt lands on the requested length; the metadata holds
    ``context_span`` (character offsets of the haystack in the prompt), the ``needles`` and their ``depths``.
    """
    hay_ids = encode(tokenizer, hay_text)
    overhead = len(encode(tokenizer, header + footer + " ".join(n for _, n in needles)))

    def build(n: int) -> str:
        return header + insert_needles(tokenizer, hay_ids, n, needles) + footer

    n, prompt = fit_to_length(tokenizer, length, build, guess=length - overhead - len(needles), name=name)
    if n >= len(hay_ids):
        raise ValueError(f"{name}: the filler text ({len(hay_ids)} tokens) is too short for length={length}")
    meta = {
        "context_span": [len(header), len(prompt) - len(footer)],
        "needles": [needle for _, needle in needles],
        "depths": [depth for depth, _ in needles],
    }
    return prompt, meta
