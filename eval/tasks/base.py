"""What every long-context task shares: the sample record, the task interface, token counting and length fitting.

A task turns ``(tokenizer, length, variant, seed)`` into :class:`Sample` s whose prompt is ``length`` tokens of the
model's own tokenizer (a few tokens short at most, never over). The runner (``eval/runner.py``) scores them through a
predictor (``eval/predictors.py``) with the rule named by the task's ``metric`` (``eval/scoring.py``):

- ``"string_match"``: greedy generation; every reference in ``answers`` must appear in the first generated line;
- ``"choice"``: log-likelihood of each of ``choices``; correct when the best one is ``answers[0]``;
- ``"perplexity"``: log-likelihood of ``answers[0]`` (a held-out continuation) after ``prompt``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

METRICS = ("string_match", "choice", "perplexity")


class CellSkipped(ValueError):
    """A cell that cannot be built (a length too short for the task, a corpus shorter than the window).

    The runner records such a cell as missing (null) with the reason, and moves on.
    """


@dataclass
class Sample:
    """One prompt with its references.

    Args:
        prompt: the text given to the model, ``length`` tokens long.
        answers: the references (``string_match``: all must appear; ``choice``: ``answers[0]`` is the right choice;
            ``perplexity``: ``answers[0]`` is the scored continuation).
        length: the requested context length in tokens.
        variant: the cell key under the length: a needle depth (``"0.50"``) or a variant name (``"q4"``).
        choices: candidate continuations of a ``choice`` task, else None.
        metadata: whatever else a test or a reader needs (needle texts, depth, the haystack's character span, ...).
    """

    prompt: str
    answers: list[str]
    length: int
    variant: str
    choices: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Task:
    """A generator of samples for one task of the suite; subclasses set the class attributes and ``make_sample``.

    Attributes:
        name: the key of the task in results.json.
        metric: one of :data:`METRICS`.
        variant_kind: ``"depth"`` when the variants are needle depths (drawn as a heatmap), else ``"variant"``.
        paper: the reference shown in the report.
        uses_real_text: whether samples are built from the real-text corpus (``eval.tasks.text``), whose
            identity the runner then records in results.json.
        revision: the generator's revision, raised whenever a change makes a cell's samples other prompts than
            before; results.json records it, and the runner refuses to resume a task scored at another revision.
    """

    name: str = ""
    metric: str = "string_match"
    variant_kind: str = "variant"
    paper: str = ""
    uses_real_text: bool = False
    revision: int = 1

    def variants(self, length: int, depths: list[float]) -> list[str]:
        """The cells of this task at ``length``; depth tasks use ``depths``, the others their own list."""
        if self.variant_kind == "depth":
            return [format_depth(d) for d in depths]
        return ["default"]

    def samples(self, tokenizer, length: int, variant: str, num_samples: int, seed: int) -> list[Sample]:
        """``num_samples`` samples of one cell, the same for the same seed whatever else is evaluated."""
        rng = cell_rng(seed, self.name, length, variant)
        return [self.make_sample(tokenizer, length, variant, rng) for _ in range(num_samples)]

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def format_depth(depth: float) -> str:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1] (a fraction of the context before the needle)")
    return f"{depth:.2f}"


def cell_rng(seed: int, *key: Any) -> random.Random:
    """A generator seeded by ``seed`` and the cell key, stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _byte_offset(tokenizer) -> int | None:
    """3 for zoo's byte tokenizer (``zoo.data.tokenizer.default_tokenizer``: transformers' ``ByT5Tokenizer`` with
    no extra ids, no added tokens beyond pad / eos / unk, special-token text split into bytes), else None. Its
    encoding is then UTF-8 with byte ``b`` at id ``b + 3``, which ``encode`` / ``decode`` do directly instead of
    through the tokenizer's per-byte Python loop (prompts of many thousand tokens are tokenised several times each
    while ``fit_to_length`` searches their size)."""
    from transformers import ByT5Tokenizer

    if type(tokenizer) is not ByT5Tokenizer or not getattr(tokenizer, "split_special_tokens", False):
        return None
    if getattr(tokenizer, "offset", None) != 3 or len(tokenizer) != 259:
        return None
    if set(tokenizer.added_tokens_decoder) != {0, 1, 2}:
        return None
    return 3


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens: what a length in this suite counts."""
    offset = _byte_offset(tokenizer)
    if offset is not None:
        return [b + offset for b in text.encode("utf-8")]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens(tokenizer, text: str) -> int:
    if _byte_offset(tokenizer) is not None:
        return len(text.encode("utf-8"))
    return len(encode(tokenizer, text))


def decode(tokenizer, ids: list[int]) -> str:
    """The text of ``ids``, special tokens skipped (a byte sequence cut inside a character loses that character,
    as the byte tokenizer's own decode does)."""
    offset = _byte_offset(tokenizer)
    if offset is not None:
        return bytes(i - offset for i in ids if i >= offset).decode("utf-8", errors="ignore")
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def fit_to_length(
    tokenizer, target: int, build: Callable[[int], str], guess: int | None = None, name: str = "task"
) -> tuple[int, str]:
    """The largest size ``n`` whose prompt ``build(n)`` has at most ``target`` tokens, and that prompt.

    ``build`` must be deterministic and (roughly) non-decreasing in length with ``n``: ``n`` counts haystack tokens,
    list entries, noise symbols, ... The search gallops from ``guess`` and then bisects, so a good guess costs a
    handful of tokenisations.
    """
    cache: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = count_tokens(tokenizer, build(n))
        return cache[n] <= target

    if not fits(0):
        raise CellSkipped(
            f"length={target} is too short for {name}: its prompt needs {cache[0]} tokens before any filler"
        )
    lo, hi = 0, max(1, target)
    if guess is not None:
        g = min(max(guess, 0), hi)
        step = 8
        if fits(g):
            lo = g
            while lo + step < hi and fits(lo + step):
                lo += step
                step *= 2
            hi = min(hi, lo + step)
        else:
            hi = g
            while hi - step > lo and not fits(hi - step):
                hi -= step
                step *= 2
            lo = max(lo, hi - step)
            if not fits(lo):
                lo = 0
    if fits(hi):
        lo = hi
    # invariant: fits(lo), and either lo == hi or not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, build(lo)


def top_up(tokenizer, target: int, build: Callable[[int], str], limit: int) -> tuple[int, str]:
    """Close the last gap to ``target`` one small step at a time: the largest ``m <= limit`` that still fits.

    ``build(m)`` lengthens a fitted prompt by ``m`` small edits (a letter added to a word, a digit appended), for
    list-like prompts whose entries are too coarse for :func:`fit_to_length` alone to land within a few tokens.
    """
    m, prompt = 0, build(0)
    while m < limit:
        longer = build(m + 1)
        if count_tokens(tokenizer, longer) > target:
            break
        m, prompt = m + 1, longer
    return m, prompt
