"""The task generators of eval/: lengths, needle depths, determinism, answers recoverable from the prompt alone,
and scoring bounds (a parsing oracle scores 100 %, a random guesser scores at chance)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from eval.scoring import normalize, score_cell, string_match
from eval.tasks import TASKS, CellSkipped, count_tokens
from eval.tasks.base import fit_to_length
from eval.tasks.listops import evaluate, grow, render
from eval.tasks.passkey import DEPTH_JITTER
from eval.tasks.passkey import FOOTER as PASSKEY_FOOTER
from eval.tasks.passkey import HEADER as PASSKEY_HEADER
from eval.tasks.ruler import zipf_counts

# Tokens a prompt may fall short of its requested length (it never exceeds it).
LENGTH_TOLERANCE = 4
LENGTHS = (512, 1024)
DEPTH_TASKS = [name for name, task in TASKS.items() if task.variant_kind == "depth"]


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from zoo.data.tokenizer import default_tokenizer

        return default_tokenizer()
    except ImportError:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(extra_ids=0)


# ---- solvers: each reads the answer from the prompt text only, as a perfect reader would


def _question(prompt: str) -> str:
    return prompt[prompt.rindex("Question:") :]


def solve_passkey(prompt):
    keys = set(re.findall(r"The pass key is (\d+)\.", prompt))
    assert len(keys) == 1
    return keys.pop()


def solve_niah(prompt):
    question = _question(prompt)
    keys = re.findall(r"the ([a-z]+-[a-z]+)", question)
    codes = [c for k in keys for c in re.findall(rf"The secret code of the {k} is (\d+)\.", prompt)]
    return " ".join(codes)


def solve_vt(prompt):
    value = re.search(r"hold the value (\d+)", prompt).group(1)
    holding = {name for name, v in re.findall(r"VAR ([A-Z]+) = (\d+)\.", prompt) if v == value}
    links = re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+)\.", prompt)
    grew = True
    while grew:
        new = {b for b, a in links if a in holding} - holding
        holding |= new
        grew = bool(new)
    return " ".join(sorted(holding))


def solve_cwe(prompt):
    k = int(re.search(r"What are the (\d+) most common", prompt).group(1))
    return " ".join(w for w, _ in Counter(re.findall(r"\d+\. ([a-z]+)", prompt)).most_common(k))


def solve_fwe(prompt):
    text = prompt.split("\n")[1]
    return " ".join(w for w, _ in Counter(text.split()).most_common(3))


def solve_mqar(prompt):
    pairs = dict(re.findall(r"([a-z]+):(\d+)", prompt))
    asked = re.search(r"Look up the values of: (.*)\n", prompt).group(1).split()
    return " ".join(pairs[k] for k in asked)


def solve_selective_copy(prompt):
    return " ".join(w for w in prompt.split("\n")[1].split() if w != "-")


PEOPLE = "Mary|John|Sandra|Daniel|Alice|Robert"
FACT = re.compile(
    rf"\b({PEOPLE}) (?:(?:went|moved|travelled|journeyed) to the (\w+)|(picked up|grabbed|took|dropped|put down|left)"
    r" the (\w+))\."
)


def solve_babi(prompt):
    place, holder, history = {}, {}, {}
    for person, to, verb, obj in FACT.findall(prompt[: prompt.rindex("Question:")]):
        if to:
            place[person] = to
            for o, who in holder.items():
                if who == person and history[o][-1] != to:
                    history[o].append(to)
        elif verb in ("picked up", "grabbed", "took"):
            holder[obj] = person
            trail = history.setdefault(obj, [])
            if not trail or trail[-1] != place[person]:
                trail.append(place[person])
        else:
            holder.pop(obj)
    question = _question(prompt)
    if m := re.search(r"Where was the (\w+) before the (\w+)\?", question):
        trail = history[m.group(1)]
        assert trail[-1] == m.group(2)
        return " " + trail[-2]
    if m := re.search(r"Where is the (\w+)\?", question):
        return " " + history[m.group(1)][-1]
    return " " + place[re.search(r"Where is (\w+)\?", question).group(1)]


def solve_listops(prompt):
    stack: list[list] = [[]]
    for token in prompt.split("\n")[1].split():
        if token.startswith("["):
            stack.append([token[1:]])
        elif token == "]":
            op, *args = stack.pop()
            stack[-1].append({"MAX": max, "MIN": min, "MED": lambda a: sorted(a)[(len(a) - 1) // 2] if len(a) % 2
                              else (sorted(a)[len(a) // 2 - 1] + sorted(a)[len(a) // 2]) // 2,
                              "SM": lambda a: sum(a) % 10}[op](args))  # fmt: skip
        else:
            stack[-1].append(int(token))
    return f" {stack[0][0]}"


def solver(name):
    if name.startswith("niah"):
        return solve_niah
    if name.startswith("babi"):
        return solve_babi
    return globals()[f"solve_{name}"]


class OracleReader:
    """Answers by solving the prompt: generation returns the solution, the solution's choice scores highest."""

    def __init__(self, name):
        self.solve = solver(name)

    def generate(self, prompts, max_new_tokens):
        return [self.solve(p) for p in prompts]

    def loglikelihood(self, contexts, continuations):
        return [
            (0.0 if normalize(c) == normalize(self.solve(x)) else -5.0, 1)
            for x, c in zip(contexts, continuations)
        ]


class RandomGuesser:
    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def generate(self, prompts, max_new_tokens):
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
        return ["".join(self.rng.choice(alphabet) for _ in range(max_new_tokens)) for _ in prompts]

    def loglikelihood(self, contexts, continuations):
        return [(self.rng.uniform(-10, 0), 1) for _ in contexts]


SOLVABLE = [name for name in TASKS if name != "perplexity"]


@pytest.mark.parametrize("name", list(TASKS))
def test_lengths_hit_within_tolerance(name, tokenizer):
    task = TASKS[name]
    for length in LENGTHS:
        for variant in task.variants(length, [0.0, 1.0]):
            for sample in task.samples(tokenizer, length, variant, 2, seed=0):
                n = count_tokens(tokenizer, sample.prompt)
                if task.metric == "perplexity":
                    n += count_tokens(tokenizer, sample.answers[0])
                assert length - LENGTH_TOLERANCE <= n <= length, (name, length, variant, n)
                assert (sample.length, sample.variant) == (length, variant)


@pytest.mark.parametrize("name", SOLVABLE)
def test_answer_recoverable_and_oracle_scores_100(name, tokenizer):
    task = TASKS[name]
    for length in LENGTHS:
        for variant in task.variants(length, [0.0, 0.5, 1.0]):
            samples = task.samples(tokenizer, length, variant, 3, seed=1)
            for sample in samples:
                assert string_match(solver(name)(sample.prompt), [a.strip() for a in sample.answers]) == 1.0
            assert score_cell(task, samples, OracleReader(name), tokenizer).score == 1.0


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_data_other_seed_other_data(name, tokenizer):
    task = TASKS[name]
    variant = task.variants(1024, [0.5])[0]
    first = task.samples(tokenizer, 1024, variant, 2, seed=0)
    again = task.samples(tokenizer, 1024, variant, 2, seed=0)
    other = task.samples(tokenizer, 1024, variant, 2, seed=1)
    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert [s.answers for s in first] == [s.answers for s in again]
    assert [s.prompt for s in first] != [s.prompt for s in other]
    assert first[0].prompt != first[1].prompt


@pytest.mark.parametrize("name", DEPTH_TASKS)
def test_needle_at_requested_depth(name, tokenizer):
    task = TASKS[name]
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        for sample in task.samples(tokenizer, 2048, f"{depth:.2f}", 2, seed=0):
            start, end = sample.metadata["context_span"]
            at = sample.prompt.index(sample.metadata["needles"][0], start)
            before = count_tokens(tokenizer, sample.prompt[start:at])
            needles = sum(count_tokens(tokenizer, n) + 1 for n in sample.metadata["needles"])
            haystack = count_tokens(tokenizer, sample.prompt[start:end]) - needles
            # the other needles may sit before the target: discount them from the measured offset
            others = [n for n in sample.metadata["needles"][1:] if sample.prompt.index(n, start) < at]
            before -= sum(count_tokens(tokenizer, n) + 1 for n in others)
            # where the needle was placed: the cell's depth, or near it for passkey (whose cells average over places)
            placed = sample.metadata["depths"][0]
            assert placed == depth if depth in (0.0, 1.0) else abs(placed - depth) <= DEPTH_JITTER, (depth, placed)
            assert abs(before / haystack - placed) < 0.03, (placed, before, haystack)


def test_passkey_cells_average_over_needle_positions(tokenizer):
    """Each sample of an interior cell puts the needle somewhere else (the filler's phase and the depth within
    DEPTH_JITTER are drawn per sample), at many distinct offsets from a 64-token segment's start; the ends stay
    right after the header and right before the question."""
    task = TASKS["passkey"]
    starts = []
    for sample in task.samples(tokenizer, 2048, "0.50", 24, seed=0):
        at = sample.prompt.index(sample.metadata["needles"][0])
        starts.append(count_tokens(tokenizer, sample.prompt[:at]))
        assert abs(starts[-1] / 2048 - 0.5) < DEPTH_JITTER + 0.01
    assert len(set(starts)) >= 12 and len({s % 64 for s in starts}) >= 12, sorted(starts)
    for sample in task.samples(tokenizer, 2048, "0.00", 4, seed=0):
        assert sample.prompt.startswith(PASSKEY_HEADER + sample.metadata["needles"][0])
    for sample in task.samples(tokenizer, 2048, "1.00", 4, seed=0):
        assert sample.prompt.endswith(sample.metadata["needles"][0] + PASSKEY_FOOTER)


@pytest.mark.parametrize("name", SOLVABLE)
def test_random_guesser_scores_at_chance(name, tokenizer):
    task = TASKS[name]
    variant = task.variants(512, [0.5])[0]
    n = 40 if task.metric == "choice" else 8
    try:
        samples = task.samples(tokenizer, 512, variant, n, seed=2)
    except CellSkipped:
        pytest.skip(f"{name} does not fit 512 tokens")
    score = score_cell(task, samples, RandomGuesser(), tokenizer).score
    chance = 1 / len(samples[0].choices) if samples[0].choices else 0.0
    # four standard deviations of a binomial mean; generation tasks: a random string matches nothing
    bound = 4 * math.sqrt(chance * (1 - chance) / n) if chance else 0.05
    assert abs(score - chance) <= bound, (score, chance)


def test_perplexity_of_oracle_and_uniform_predictors(tokenizer):
    task = TASKS["perplexity"]
    samples = task.samples(tokenizer, 1024, "last256", 3, seed=0)
    assert all(count_tokens(tokenizer, s.answers[0]) == 256 for s in samples)

    class Certain:
        def loglikelihood(self, contexts, continuations):
            return [(0.0, count_tokens(tokenizer, c)) for c in continuations]

    class Uniform:
        def loglikelihood(self, contexts, continuations):
            return [
                (-count_tokens(tokenizer, c) * math.log(259), count_tokens(tokenizer, c))
                for c in continuations
            ]

    assert score_cell(task, samples, Certain(), tokenizer).score == pytest.approx(1.0)
    assert score_cell(task, samples, Uniform(), tokenizer).score == pytest.approx(259.0)


def test_fit_to_length_finds_largest_fitting_size(tokenizer):
    n, prompt = fit_to_length(tokenizer, 100, lambda n: "ab" * n, guess=7)
    assert (n, count_tokens(tokenizer, prompt)) == (50, 100)
    with pytest.raises(CellSkipped, match="too short"):
        fit_to_length(tokenizer, 3, lambda n: "abcd" + "x" * n)


def test_byte_tokenizer_shortcut_equals_the_tokenizer(tokenizer):
    """The suite's encode / count / decode read zoo's byte tokenizer as plain UTF-8: the same ids and text as the
    tokenizer's own calls, for non-ASCII text, special-token text, special ids and cuts inside a character; other
    tokenizers (ByT5 with extra ids, or without split special tokens) go through the tokenizer."""
    from transformers import ByT5Tokenizer

    from eval.tasks.base import _byte_offset, decode, encode

    assert _byte_offset(tokenizer) == 3
    assert _byte_offset(ByT5Tokenizer()) is None and _byte_offset(ByT5Tokenizer(extra_ids=0)) is None
    rng = random.Random(0)
    alphabet = "ab Z.,\n\t\x00\x7fé中😀</s><pad><unk>"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert encode(tokenizer, text) == ids and count_tokens(tokenizer, text) == len(ids)
        ids += [rng.choice([0, 1, 2]) for _ in range(rng.randint(0, 3))]
        rng.shuffle(ids)
        i, j = sorted(rng.randint(0, len(ids)) for _ in range(2))
        expected = tokenizer.decode(ids[i:j], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert decode(tokenizer, ids[i:j]) == expected


def test_zipf_counts_top_three_strictly_ahead():
    for total in (10, 54, 100, 1000, 20000):
        counts = zipf_counts(total)
        assert counts[0] > counts[1] > counts[2] > max(counts[3:], default=0)
        assert sum(counts) >= total


def test_listops_evaluation():
    assert evaluate(("MAX", [2, 9, ("MIN", [4, 7]), 0])) == 9
    assert evaluate(("SM", [5, 6, ("MED", [1, 8, 3, 4])])) == 4
    tree = grow(random.Random(0), 300)
    assert solve_listops(f"header\n{render(tree)}\nfooter") == f" {evaluate(tree)}"


def test_string_match_normalises():
    assert string_match("  The key is 12345.\nmore", ["12345"]) == 1.0
    assert string_match("\n\n12 345", ["12345"]) == 0.0
    assert string_match("kabe, ROFI and zu", ["rofi", "kabe", "lomu"]) == pytest.approx(2 / 3)
    assert string_match("x", ["x y"]) == 0.0


@pytest.fixture
def fresh_real_text():
    from eval.tasks import text

    text._real_text.cache_clear()
    yield text
    text._real_text.cache_clear()


def test_real_text_corpus_failures_are_never_silent(fresh_real_text, monkeypatch):
    import sys

    import zoo.data.corpus

    text = fresh_real_text
    monkeypatch.setattr(zoo.data.corpus, "default_corpus", lambda split: ["a held-out document"])
    assert text.real_text_documents() == ("a held-out document",)
    corpus = text.real_text_corpus()
    assert corpus["name"] == text.ZOO_CORPUS and corpus["documents"] == 1
    text._real_text.cache_clear()
    monkeypatch.setattr(zoo.data.corpus, "default_corpus", lambda split: ["another held-out document"])
    assert text.real_text_corpus()["sha256"] != corpus["sha256"], "the digest tells two corpora apart"

    # A broken corpus fails instead of swapping in another one.
    def broken(split):
        raise OSError("corpus cache unreadable")

    text._real_text.cache_clear()
    monkeypatch.setattr(zoo.data.corpus, "default_corpus", broken)
    with pytest.raises(OSError, match="corpus cache unreadable"):
        text.real_text_documents()
    text._real_text.cache_clear()
    monkeypatch.setattr(zoo.data.corpus, "default_corpus", lambda split: [])
    with pytest.raises(RuntimeError, match="test split of the default corpus is empty"):
        text.real_text_documents()
    # so does an absent data package: no other text stands in for it
    text._real_text.cache_clear()
    monkeypatch.setitem(sys.modules, "zoo.data.corpus", None)
    with pytest.raises(ImportError):
        text.real_text_documents()
