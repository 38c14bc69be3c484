"""The leaderboard's data: one token vocabulary, a text stream, and two retrieval tasks built directly as token ids.

Retrieval is measured at a size where small models can learn it only if each key and each value is one token
(Arora et al., 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models": multi-query
associative recall with single-token keys and values). The vocabulary is the byte tokenizer's 259 ids (text),
then ``num_keys`` key tokens, ``num_values`` value tokens and one passkey marker, rounded up to a multiple of 8.

* **text**: the embedded corpus (``zoo.data.corpus``), bytes as ids, documents joined by ``</s>``; every token is
  a target.
* **recall** (MQAR across a gap): ``n`` key-value pairs ``k1 v1 … kn vn``, then ``g`` tokens of text, then every
  key again in a random order, each followed by its value. Targets are the queried values only. Evaluated with the
  pairs fixed and the gap growing with the length: can the model still retrieve what it read ``ℓ`` tokens ago?
* **passkey** (Mohtashami & Jaggi, 2023, "Landmark Attention"): a marker and 3 value tokens hidden at a depth of a
  text haystack; at the end the marker again, and the 3 tokens are the targets. A sample counts as retrieved when
  all 3 are.

Answers are scored teacher-forced: the argmax of the logits before each target token, in one forward pass.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100
BYTE_VOCAB = 259  # zoo.data.tokenizer.DEFAULT_VOCAB_SIZE
EOS = 1
PASSKEY_DIGITS = 3


@dataclass(frozen=True)
class Vocab:
    """Token ids of the leaderboard's vocabulary."""

    num_keys: int = 64
    num_values: int = 64

    def key(self, i: int) -> int:
        return BYTE_VOCAB + i

    def value(self, j: int) -> int:
        return BYTE_VOCAB + self.num_keys + j

    @property
    def passkey_marker(self) -> int:
        return BYTE_VOCAB + self.num_keys + self.num_values

    @property
    def size(self) -> int:
        used = self.passkey_marker + 1
        return -(-used // 8) * 8

    def token_names(self) -> list[str]:
        """Names of the ids after the bytes, in order (for the saved tokenizer)."""
        names = [f"<k{i}>" for i in range(self.num_keys)] + [f"<v{j}>" for j in range(self.num_values)]
        names.append("<passkey>")
        names += [f"<unused{i}>" for i in range(self.size - BYTE_VOCAB - len(names))]
        return names


def tokenizer_for(vocab: Vocab):
    """The byte tokenizer with the task tokens added, so that a saved model decodes its whole vocabulary."""
    from zoo.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    tokenizer.add_tokens(vocab.token_names())
    if len(tokenizer) != vocab.size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, the vocabulary {vocab.size}")
    return tokenizer


def text_stream(documents: list[str], min_tokens: int) -> torch.Tensor:
    """The documents as byte ids (``byte + 3``), joined by ``</s>``, repeated until ``min_tokens`` long."""
    if not documents:
        raise ValueError("the text corpus is empty")
    data = "\x00".join(documents).encode("utf-8")
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64) + 3
    ids[ids == 3] = EOS  # the joining NUL bytes
    if ids.numel() < min_tokens:
        ids = ids.repeat(-(-min_tokens // ids.numel()))
    return ids


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


class TaskMaker:
    """Draws samples of each task from a text stream, deterministic in the ``random.Random`` it is given."""

    def __init__(self, vocab: Vocab, text: torch.Tensor):
        self.vocab = vocab
        self.text = text

    def filler(self, rng: random.Random, n: int) -> list[int]:
        if n <= 0:
            return []
        if n > self.text.numel():
            raise ValueError(f"the text stream has {self.text.numel()} tokens, {n} asked for")
        start = rng.randrange(self.text.numel() - n + 1)
        return self.text[start : start + n].tolist()

    def text_sample(self, rng: random.Random, length: int) -> Sample:
        ids = self.filler(rng, length)
        return Sample(ids, list(ids))

    def recall(self, rng: random.Random, length: int, num_pairs: int, gap: int | None = None) -> Sample:
        """``num_pairs`` pairs, a text gap (``gap`` tokens, or as long as fits when None), the queries, then text
        to fill ``length`` when the gap was given shorter."""
        v = self.vocab
        if not 1 <= num_pairs <= v.num_keys:
            raise ValueError(f"num_pairs must be in 1..{v.num_keys}, got {num_pairs}")
        room = length - 4 * num_pairs
        if room < 0:
            raise ValueError(f"length {length} is too short for {num_pairs} pairs (needs {4 * num_pairs})")
        gap = room if gap is None else gap
        if not 0 <= gap <= room:
            raise ValueError(f"gap must be in 0..{room}, got {gap}")
        keys = rng.sample(range(v.num_keys), num_pairs)
        values = [rng.randrange(v.num_values) for _ in keys]
        ids = [t for k, x in zip(keys, values) for t in (v.key(k), v.value(x))]
        labels = [IGNORE] * len(ids)
        filler = self.filler(rng, gap)
        ids += filler
        labels += [IGNORE] * len(filler)
        for i in rng.sample(range(num_pairs), num_pairs):
            ids += [v.key(keys[i]), v.value(values[i])]
            labels += [IGNORE, v.value(values[i])]
        tail = self.filler(rng, length - len(ids))
        return Sample(ids + tail, labels + [IGNORE] * len(tail))

    def passkey(self, rng: random.Random, length: int, depth: float) -> Sample:
        """A ``PASSKEY_DIGITS``-token passkey at ``depth`` (0 = start, 1 = end) of a text haystack, asked for at the end."""
        v = self.vocab
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        key = [v.value(rng.randrange(v.num_values)) for _ in range(PASSKEY_DIGITS)]
        needle = [v.passkey_marker, *key]
        haystack_len = length - 2 * len(needle)
        if haystack_len < 0:
            raise ValueError(f"length {length} is too short for a passkey (needs {2 * len(needle)})")
        haystack = self.filler(rng, haystack_len)
        at = round(depth * haystack_len)
        ids = haystack[:at] + needle + haystack[at:] + needle
        labels = [IGNORE] * (length - PASSKEY_DIGITS) + key
        return Sample(ids, labels)


def collate(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = {len(s.input_ids) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples of one batch must have one length, got {sorted(lengths)}")
    return (
        torch.tensor([s.input_ids for s in samples], dtype=torch.long),
        torch.tensor([s.labels for s in samples], dtype=torch.long),
    )


@dataclass(frozen=True)
class Mixture:
    """What a training batch is made of: the share of each task, and the training tasks' settings."""

    text: float = 1.0
    recall: float = 2.0
    passkey: float = 1.0
    max_pairs: int = 4

    def weights(self) -> dict[str, float]:
        weights = {"text": self.text, "recall": self.recall, "passkey": self.passkey}
        if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        return weights


def training_batch(
    maker: TaskMaker, mixture: Mixture, rng: random.Random, batch_size: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of ``length``-token samples, each task drawn with the mixture's weights."""
    weights = mixture.weights()
    names = list(weights)
    samples = []
    for task in rng.choices(names, weights=[weights[n] for n in names], k=batch_size):
        if task == "text":
            samples.append(maker.text_sample(rng, length))
        elif task == "recall":
            pairs = rng.randint(1, min(mixture.max_pairs, length // 4))
            samples.append(maker.recall(rng, length, pairs, gap=rng.randint(0, length - 4 * pairs)))
        else:
            samples.append(maker.passkey(rng, length, rng.random()))
    return collate(samples)
