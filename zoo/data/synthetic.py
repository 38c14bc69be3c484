"""Synthetic tasks: small, exactly known training data for tiny models and for probing an architecture.

Every generator takes ``(n, seed, **options)`` and returns ``n`` ASCII documents (one example each): the same
for the same arguments on every machine (``random.Random(seed)``), different for different seeds. The formats,
with ``->`` between a question and its answer:

======================  ====================================  ==================================
task                    example                               what it takes
======================  ====================================  ==================================
``copy``                ``copy qmzta -> qmzta``               exact recall of a span
``reverse``             ``reverse qmzta -> atzmq``            recall in reverse order
``sort``                ``sort qmzta -> amqtz``               reordering by content
``associative_recall``  ``kq:81 zd:07 mo:33 ? zd -> 07``      key-value lookup (induction heads)
``counting``            ``count a in abacad -> 3``            counting over the context
``arithmetic``          ``37+508=545``                        carrying digits
``markov``              text of an order-2 char Markov chain  reaching a known entropy rate
``passkey``             ``... The pass key is 40517. ...``    retrieval across a long context
                        ``... What is the pass key? The
                        pass key is 40517.``
``babi_single_fact``    ``Mary went to the kitchen. ...       finding the one supporting fact
                        Where is Mary? kitchen``              among distractors
``passkey_suite``       the eval suite's passkey prompt and   ``passkey`` as the suite scores it
                        its answer, ``length`` tokens
``babi_suite``          the eval suite's bAbI prompt (real     ``babi_qa1`` as the suite scores it
                        text of the train split) and its
                        answer, ``length`` tokens
``babi_drill``          ``Mary kitchen.`` ``Question: Where   the lookup ``babi_qa1`` needs, with
                        is John?`` ``Answer: office`` after   an answer after every sentence
                        every sentence of a short story
======================  ====================================  ==================================

The two long-context tasks hide what must be recalled in filler sentences, up to a length drawn between
``min_len`` and ``max_len`` characters (tokens, with the byte tokenizer): ``passkey`` a five-digit key, as in
passkey retrieval (Mohtashami & Jaggi, 2023, arXiv:2305.16300), ``babi_single_fact`` a short story of people moving
between places, asked where one of them is, as bAbI's first task (Weston et al., 2015, arXiv:1502.05698) hidden in
long text as BABILong does (Kuratov et al., 2024, arXiv:2406.10149). Templates and filler sentences are zoo's own.

Every task but ``markov`` has an answer: :func:`answer_span` gives its characters, and
``synthetic_dataset(..., answer_spans=True)`` carries them as columns, for a loss on the answer alone.
``babi_drill`` has several answers a document (:func:`answer_spans_of` gives them all; its columns hold lists).

The Markov chain is fixed by ``chain_seed``, not ``seed``, so training and evaluation sets drawn with
different seeds come from the same chain; :func:`markov_chain` gives it with its entropy rate, the best
loss reachable.

    >>> from zoo.data import synthetic_dataset
    >>> ds = synthetic_dataset("associative_recall", n=1000, seed=0, num_pairs=8)   # Dataset with "text"
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

LOWERCASE = string.ascii_lowercase


def _random_string(rng: random.Random, min_len: int, max_len: int, alphabet: str) -> str:
    _check_lengths(min_len, max_len)
    return "".join(rng.choices(alphabet, k=rng.randint(min_len, max_len)))


def _check_lengths(min_len: int, max_len: int) -> None:
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")


def copy(
    n: int, seed: int = 0, *, min_len: int = 4, max_len: int = 32, alphabet: str = LOWERCASE
) -> list[str]:
    """``copy <s> -> <s>`` for random strings ``s`` of ``min_len..max_len`` characters."""
    rng = random.Random(seed)
    return [f"copy {s} -> {s}" for s in (_random_string(rng, min_len, max_len, alphabet) for _ in range(n))]


def reverse(
    n: int, seed: int = 0, *, min_len: int = 4, max_len: int = 32, alphabet: str = LOWERCASE
) -> list[str]:
    """``reverse <s> -> <s reversed>``."""
    rng = random.Random(seed)
    return [
        f"reverse {s} -> {s[::-1]}"
        for s in (_random_string(rng, min_len, max_len, alphabet) for _ in range(n))
    ]


def sort(
    n: int, seed: int = 0, *, min_len: int = 4, max_len: int = 32, alphabet: str = LOWERCASE
) -> list[str]:
    """``sort <s> -> <characters of s in ascending order>``."""
    rng = random.Random(seed)
    strings = (_random_string(rng, min_len, max_len, alphabet) for _ in range(n))
    return [f"sort {s} -> {''.join(sorted(s))}" for s in strings]


def associative_recall(
    n: int, seed: int = 0, *, num_pairs: int = 8, key_len: int = 2, value_len: int = 2
) -> list[str]:
    """``k1:v1 k2:v2 ... ? ki -> vi``: ``num_pairs`` distinct lowercase keys, digit values, then a query."""
    if num_pairs > len(LOWERCASE) ** key_len // 2:
        raise ValueError(
            f"num_pairs={num_pairs} is too many distinct keys for key_len={key_len}; raise key_len"
        )
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        keys: dict[str, str] = {}
        while len(keys) < num_pairs:
            key = "".join(rng.choices(LOWERCASE, k=key_len))
            keys.setdefault(key, "".join(rng.choices(string.digits, k=value_len)))
        query = rng.choice(list(keys))
        pairs = " ".join(f"{k}:{v}" for k, v in keys.items())
        docs.append(f"{pairs} ? {query} -> {keys[query]}")
    return docs


def counting(
    n: int, seed: int = 0, *, min_len: int = 4, max_len: int = 32, alphabet: str = "abcd"
) -> list[str]:
    """``count <c> in <s> -> <occurrences of c in s>``, over a small alphabet so that counts are not all 0."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        s = _random_string(rng, min_len, max_len, alphabet)
        c = rng.choice(alphabet)
        docs.append(f"count {c} in {s} -> {s.count(c)}")
    return docs


def arithmetic(n: int, seed: int = 0, *, max_digits: int = 3) -> list[str]:
    """``a+b=c`` for non-negative integers of 1..``max_digits`` digits each."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = (rng.randrange(10 ** rng.randint(1, max_digits)) for _ in range(2))
        docs.append(f"{a}+{b}={a + b}")
    return docs


@dataclass(frozen=True)
class MarkovChain:
    """An order-2 character Markov chain: the next character depends on the two before it.

    Attributes:
        alphabet: the characters it emits.
        transitions: for each two-character context, the probabilities of each character of ``alphabet`` next.
        stationary: the stationary probability of each two-character context.
    """

    alphabet: str
    transitions: dict[str, tuple[float, ...]]
    stationary: dict[str, float]

    @property
    def entropy_rate(self) -> float:
        """Bits per character in the long run, ``sum_ctx pi(ctx) * H(next | ctx)``; times ln 2 for nats."""
        return sum(
            self.stationary[ctx] * -sum(p * math.log2(p) for p in probs if p > 0)
            for ctx, probs in self.transitions.items()
        )

    def sample(self, length: int, rng: random.Random) -> str:
        """``length`` characters, the first two drawn from the stationary distribution."""
        contexts = list(self.stationary)
        out = list(rng.choices(contexts, weights=list(self.stationary.values()))[0])
        while len(out) < length:
            out.append(rng.choices(self.alphabet, weights=self.transitions[out[-2] + out[-1]])[0])
        return "".join(out[:length])


@functools.lru_cache(maxsize=16)
def markov_chain(alphabet: str = "abcdefgh ", concentration: float = 0.3, chain_seed: int = 0) -> MarkovChain:
    """A random order-2 chain: each context's next-character law is drawn from Dirichlet(concentration).

    A smaller ``concentration`` makes the rows peakier, and the entropy rate lower.
    """
    if len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
        raise ValueError(f"alphabet must have >= 2 distinct characters, got {alphabet!r}")
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    rng = random.Random(chain_seed)
    contexts = [a + b for a in alphabet for b in alphabet]
    transitions = {}
    for ctx in contexts:
        # A tiny floor keeps every transition possible: the chain is irreducible, its stationary law unique.
        weights = [max(rng.gammavariate(concentration, 1.0), 1e-12) for _ in alphabet]
        total = sum(weights)
        transitions[ctx] = tuple(w / total for w in weights)
    # Power iteration for the stationary distribution over contexts: (a, b) -> (b, c) with P(c | ab).
    pi = dict.fromkeys(contexts, 1.0 / len(contexts))
    for _ in range(10_000):
        nxt = dict.fromkeys(contexts, 0.0)
        for ctx, mass in pi.items():
            for c, p in zip(alphabet, transitions[ctx]):
                nxt[ctx[1] + c] += mass * p
        done = max(abs(nxt[c] - pi[c]) for c in contexts) < 1e-13
        pi = nxt
        if done:
            break
    return MarkovChain(alphabet=alphabet, transitions=transitions, stationary=pi)


def markov(
    n: int,
    seed: int = 0,
    *,
    length: int = 256,
    alphabet: str = "abcdefgh ",
    concentration: float = 0.3,
    chain_seed: int = 0,
) -> list[str]:
    """``n`` strings of ``length`` characters from ``markov_chain(alphabet, concentration, chain_seed)``."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    chain = markov_chain(alphabet, concentration, chain_seed)
    rng = random.Random(seed)
    return [chain.sample(length, rng) for _ in range(n)]


# Filler for the long-context tasks: plain sentences that carry nothing a question asks about.
FILLER_SENTENCES = (
    "The train left the station on time.",
    "A light rain fell over the hills.",
    "The market opened early that morning.",
    "Birds sang in the old oak tree.",
    "The lamp in the window stayed lit.",
    "Someone was baking bread next door.",
    "The river was calm and wide.",
    "A dog barked somewhere down the road.",
    "The clock in the hall struck nine.",
    "Clouds drifted slowly to the east.",
    "The shop on the corner sold maps.",
    "Leaves covered the path to the gate.",
)
PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Anna", "Peter")
PLACES = ("kitchen", "garden", "hallway", "bathroom", "bedroom", "office", "cellar", "balcony")
MOVES = ("went to", "moved to", "walked to", "travelled to", "ran to", "went back to")


def _hide_in_filler(rng: random.Random, target_len: int, sentences: list[str], tail: str) -> str:
    """``sentences`` in order at random places among filler sentences, then ``tail``: as many filler sentences
    as bring the whole to at least ``target_len`` characters."""
    length = sum(len(x) + 1 for x in [*sentences, tail])
    filler = []
    while length < target_len:
        filler.append(rng.choice(FILLER_SENTENCES))
        length += len(filler[-1]) + 1
    # Each inserted sentence goes before filler sentence number `slot`; equal slots keep their order.
    slots = sorted(rng.randint(0, len(filler)) for _ in sentences)
    parts = []
    for i in range(len(filler) + 1):
        parts.extend(x for x, slot in zip(sentences, slots) if slot == i)
        if i < len(filler):
            parts.append(filler[i])
    return " ".join([*parts, tail])


def passkey(
    n: int, seed: int = 0, *, min_len: int = 256, max_len: int = 1024, key_digits: int = 5
) -> list[str]:
    """A ``key_digits``-digit pass key stated once at a random place in filler text of ``min_len..max_len``
    characters, asked for at the end: ``... What is the pass key? The pass key is <key>.``"""
    _check_lengths(min_len, max_len)
    if not 1 <= key_digits <= 18:
        raise ValueError(f"key_digits must be in 1..18, got {key_digits}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        key = str(rng.randrange(10 ** (key_digits - 1), 10**key_digits))
        needle = f"The pass key is {key}. Remember it."
        tail = f"What is the pass key? The pass key is {key}."
        docs.append(_hide_in_filler(rng, rng.randint(min_len, max_len), [needle], tail))
    return docs


def passkey_suite(n: int, seed: int = 0, *, length: int = 512, end_share: float = 0.0) -> list[str]:
    """Passkey prompts made by the eval suite's own generator (``eval.tasks.passkey``, the repository's suite: its
    header, repeated filler, the needle at a uniformly drawn depth, its question), each followed by its answer,
    `` <key>.``: ``length`` tokens of zoo's byte tokenizer with the end-of-text token, so that a document fills a
    training block of ``length`` exactly.

    ``end_share`` of the documents (drawn per document) put the needle at an end of the haystack instead, depth 0 or
    1 with equal odds, as the suite's own grid does at its ends. Uniform depths seldom put it there: the last of 32
    segments holds the needle in 1 document in 32, yet at depth 1 a segment-recurrent model writes the key after the
    longest run of filler, in the segment of the question. 0 (the default) draws the same documents as before."""
    from eval.tasks.base import CellSkipped
    from eval.tasks.passkey import Passkey
    from zoo.data.tokenizer import default_tokenizer

    if not 0.0 <= end_share <= 1.0:
        raise ValueError(f"end_share must be in [0, 1] (a share of the documents), got {end_share}")
    answer = len(" 12345.") + 1  # the answer's tokens and the end-of-text token
    tokenizer, task, rng = default_tokenizer(), Passkey(), random.Random(seed)
    docs = []
    for _ in range(n):
        depth = rng.random()
        if end_share and rng.random() < end_share:  # no extra draw at 0: the default documents stay as they were
            depth = float(depth >= 0.5)
        try:
            sample = task.make_sample(tokenizer, length - answer, f"{depth:.3f}", rng)
        except CellSkipped as err:
            raise ValueError(f"passkey_suite: length={length} is too short ({err})") from None
        docs.append(f"{sample.prompt} {sample.answers[0]}.")
    return docs


@functools.lru_cache(maxsize=1)
def _train_split_documents() -> tuple[str, ...]:
    from eval.tasks.text import real_text_documents

    return tuple(d for d in (re.sub(r"\s+", " ", doc).strip() for doc in real_text_documents("train")) if d)


def _train_split_text(rng: random.Random, min_chars: int) -> str:
    """Stretches of real documents of zoo's corpus *train* split in a seeded order, whitespace collapsed: the
    filler of :func:`babi_suite`, kept apart from the test split the eval suite hides its stories in."""
    documents = _train_split_documents()
    if not documents:
        raise ValueError("babi_suite: the train split of zoo's corpus is empty")
    parts: list[str] = []
    total = 0
    while total < min_chars:
        doc = documents[rng.randrange(len(documents))]
        start = rng.randrange(max(1, len(doc) - min_chars))  # a random stretch: long documents vary too
        parts.append(doc[start : start + min_chars - total])
        total += len(parts[-1]) + 1
    return " ".join(parts)


def _fact_range(num_facts) -> tuple[int, int]:
    """``num_facts`` ``[lowest, highest]`` checked, as a pair of ints."""
    if len(num_facts) != 2 or not 1 <= num_facts[0] <= num_facts[1]:
        raise ValueError(f"num_facts={num_facts!r}: expected [lowest, highest] with 1 <= lowest <= highest")
    return int(num_facts[0]), int(num_facts[1])


def babi_suite(
    n: int, seed: int = 0, *, length: int = 512, supporting: int = 1, num_facts: list[int] | None = None
) -> list[str]:
    """bAbI prompts in the eval suite's own format (``eval.tasks.babilong``: its header, its story generator with
    the facts at uniformly drawn depths in real text, ``Question: Where is Mary?`` / ``Answer:``), each followed by
    its answer, `` kitchen``. The prompt has ``length`` tokens of zoo's byte tokenizer, as the suite builds it for
    a cell of that length, and the answer comes after (up to 9 tokens and the end-of-text token: a block of
    ``length + 10`` holds a document): with ``length`` a multiple of a segment-recurrent model's segment, the
    answer starts a new segment, where the suite scores it. The real text comes from zoo's corpus train split,
    never from the test split the suite scores on. ``num_facts`` ``[lowest, highest]``: the story's sentences for
    ``supporting=1`` (default the suite's 4-8), fewer for a curriculum's first stages."""
    from eval.tasks.babilong import HEADER, make_question
    from eval.tasks.base import CellSkipped
    from eval.tasks.text import filler_chars, haystack_prompt
    from zoo.data.tokenizer import default_tokenizer

    if supporting not in (1, 2, 3):
        raise ValueError(f"supporting={supporting} must be 1, 2 or 3 (the bAbI tasks qa1, qa2, qa3)")
    if num_facts is not None:
        if supporting != 1:
            raise ValueError(f"num_facts applies to supporting=1 stories, got supporting={supporting}")
        num_facts = _fact_range(num_facts)
    tokenizer, rng = default_tokenizer(), random.Random(seed)
    docs = []
    for _ in range(n):
        facts, question, place = make_question(rng, supporting, num_facts)
        depths = sorted(rng.random() for _ in facts)
        footer = f"\n\nQuestion: {question}\nAnswer:"
        hay = _train_split_text(rng, filler_chars(tokenizer, length))
        try:
            prompt, _ = haystack_prompt(
                tokenizer, length, HEADER, footer, hay, list(zip(depths, facts)), "babi_suite"
            )
        except CellSkipped as err:
            raise ValueError(f"babi_suite: length={length} is too short ({err})") from None
        docs.append(f"{prompt} {place}")
    return docs


def babi_single_fact(
    n: int, seed: int = 0, *, num_facts: int = 4, min_len: int = 256, max_len: int = 1024
) -> list[str]:
    """``num_facts`` sentences of people moving between places (``Mary went to the kitchen.``) hidden in filler
    text of ``min_len..max_len`` characters, then ``Where is <person>? <place>``: the place of that person's last
    move, the one fact that answers it."""
    _check_lengths(min_len, max_len)
    if num_facts < 1:
        raise ValueError(f"num_facts must be >= 1, got {num_facts}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        where: dict[str, str] = {}
        facts = []
        for _ in range(num_facts):
            person, place = rng.choice(PEOPLE), rng.choice(PLACES)
            facts.append(f"{person} {rng.choice(MOVES)} the {place}.")
            where[person] = place
        person = rng.choice(list(where))
        docs.append(
            _hide_in_filler(rng, rng.randint(min_len, max_len), facts, f"Where is {person}? {where[person]}")
        )
    return docs


def babi_drill(
    n: int,
    seed: int = 0,
    *,
    num_facts: list[int] | None = None,
    num_people: int = 4,
    other_share: float = 0.5,
    compact: bool = True,
) -> list[str]:
    """Drills for the lookup of bAbI's first task: a short story of ``num_facts`` ``[lowest, highest]`` (default
    2-4) moves among ``num_people`` of the eval suite's people and places, with a question in the suite's words
    after every sentence and its answer: ``Mary kitchen. \nQuestion: Where is Mary?\nAnswer: kitchen\n...``
    (``compact``; else the suite's sentences, ``Mary went to the kitchen.``). With probability ``other_share`` a
    question asks about someone other than the person who just moved, so that recency alone cannot answer it.

    Every answer is a target (:func:`answer_spans_of`), so a story of four sentences teaches four lookups where a
    :func:`babi_suite` prompt teaches one. A small RWKV-7 learns the lookup from these (its training loss leaves
    the recency plateau after ~400 steps of 32 stories) where it does not from the suite's prompts; see
    ``configs/rmt/babi_drill.yaml``."""
    from eval.tasks.babilong import MOVE_VERBS
    from eval.tasks.babilong import PEOPLE as SUITE_PEOPLE
    from eval.tasks.babilong import PLACES as SUITE_PLACES

    lo, hi = (2, 4) if num_facts is None else _fact_range(num_facts)
    if not 1 <= num_people <= len(SUITE_PEOPLE):
        raise ValueError(f"num_people={num_people} must be between 1 and {len(SUITE_PEOPLE)} (the suite's people)")
    if not 0.0 <= other_share <= 1.0:
        raise ValueError(f"other_share={other_share} must be a probability, in [0, 1]")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        people = rng.sample(SUITE_PEOPLE, num_people)
        where: dict[str, str] = {}
        parts = []
        for _ in range(rng.randint(lo, hi)):
            person = rng.choice(people)
            place = rng.choice([p for p in SUITE_PLACES if p != where.get(person)])
            where[person] = place
            parts.append(f"{person} {place}. " if compact else f"{person} {rng.choice(MOVE_VERBS)} to the {place}. ")
            others = sorted(p for p in where if p != person)
            asked = rng.choice(others) if others and rng.random() < other_share else rng.choice(sorted(where))
            parts.append(f"\nQuestion: Where is {asked}?\nAnswer: {where[asked]}\n")
        docs.append("".join(parts))
    return docs


SYNTHETIC_TASKS: dict[str, Callable[..., list[str]]] = {
    "copy": copy,
    "reverse": reverse,
    "sort": sort,
    "associative_recall": associative_recall,
    "counting": counting,
    "arithmetic": arithmetic,
    "markov": markov,
    "passkey": passkey,
    "babi_single_fact": babi_single_fact,
    "passkey_suite": passkey_suite,
    "babi_suite": babi_suite,
    "babi_drill": babi_drill,
}


# Where each task's answer starts: after the last occurrence of its marker; it runs to the end of the document,
# less the characters of its trailing punctuation (passkey's final full stop).
ANSWER_MARKERS: dict[str, tuple[str, int]] = {
    "copy": (" -> ", 0),
    "reverse": (" -> ", 0),
    "sort": (" -> ", 0),
    "associative_recall": (" -> ", 0),
    "counting": (" -> ", 0),
    "arithmetic": ("=", 0),
    "passkey": ("The pass key is ", 1),
    "babi_single_fact": ("? ", 0),
    # the space before the key too (the answer follows "is"), and the full stop after it: the suite scores the key
    # as a whole word of the generated line, so a model must learn to stop after the fifth digit
    "passkey_suite": ("The pass key is", 0),
    "babi_suite": ("\nAnswer:", 0),  # the space before the place too, as the suite scores its choices
}
# Tasks with an answer after every occurrence of their marker, each running to the end of its line.
MULTI_ANSWER_MARKERS: dict[str, str] = {"babi_drill": "\nAnswer:"}
# every task with something to mark for `data.loss: answer_only`
ANSWERED_TASKS = frozenset({*ANSWER_MARKERS, *MULTI_ANSWER_MARKERS})


def answer_spans_of(name: str, doc: str) -> list[tuple[int, int]]:
    """Every answer of ``doc``, as :func:`answer_span`'s ``(start, end)`` pairs in order: one for most tasks;
    for ``babi_drill``, each question's (the space before the place included, the line's end not)."""
    if name not in MULTI_ANSWER_MARKERS:
        return [answer_span(name, doc)]
    marker, spans, at = MULTI_ANSWER_MARKERS[name], [], doc.find(MULTI_ANSWER_MARKERS[name])
    while at >= 0:
        start = at + len(marker)
        end = doc.find("\n", start)
        end = len(doc) if end < 0 else end
        if end > start:
            spans.append((start, end))
        at = doc.find(marker, end)
    if not spans:
        raise ValueError(f"no {marker!r} followed by an answer in this {name} document: {doc[-80:]!r}")
    return spans


def answer_span(name: str, doc: str) -> tuple[int, int]:
    """``(start, end)``: the characters of ``doc`` (a document of the task ``name``) that answer its question,
    ``doc[start:end]`` (``40517`` of a passkey document, ``kitchen`` of a bAbI one, the text after ``->``)."""
    if name not in ANSWERED_TASKS:
        known = ", ".join(sorted(ANSWERED_TASKS))
        raise ValueError(f"synthetic task {name!r} has no answer to mark (tasks with one: {known})")
    if name in MULTI_ANSWER_MARKERS:
        raise ValueError(f"synthetic task {name!r} has several answers a document: use answer_spans_of")
    marker, trailing = ANSWER_MARKERS[name]
    at = doc.rfind(marker)
    if at < 0:
        raise ValueError(f"no {marker!r} in this {name} document, so no answer: {doc[-80:]!r}")
    return at + len(marker), len(doc) - trailing


def synthetic_documents(name: str, n: int, seed: int = 0, **options) -> list[str]:
    """``n`` documents of the task ``name`` (a key of :data:`SYNTHETIC_TASKS`)."""
    if name not in SYNTHETIC_TASKS:
        raise ValueError(
            f"Unknown synthetic task {name!r}; known tasks: {', '.join(sorted(SYNTHETIC_TASKS))}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return SYNTHETIC_TASKS[name](n, seed, **options)


def synthetic_dataset(name: str, n: int, seed: int = 0, *, answer_spans: bool = False, **options):
    """The documents of :func:`synthetic_documents` as a ``datasets.Dataset`` with a ``"text"`` column; with
    ``answer_spans``, also ``"answer_start"`` and ``"answer_end"``, the characters of :func:`answer_span`, which
    ``make_packed_dataset(..., answer_only=True)`` turns into a loss on the answer tokens only; for a task with
    several answers a document (``babi_drill``) these columns hold lists, one entry an answer."""
    from datasets import Dataset

    docs = synthetic_documents(name, n, seed, **options)
    columns = {"text": docs}
    if answer_spans:
        spans = [answer_spans_of(name, doc) for doc in docs]
        several = name in MULTI_ANSWER_MARKERS
        columns["answer_start"] = [[a for a, _ in d] if several else d[0][0] for d in spans]
        columns["answer_end"] = [[b for _, b in d] if several else d[0][1] for d in spans]
    return Dataset.from_dict(columns)
