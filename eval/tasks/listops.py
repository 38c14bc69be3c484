"""ListOps as ten-way classification: the value (a digit) of a nested list expression.

Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", 2020, after Nangia & Bowman, 2018. The
operators are those of LRA: ``MAX``, ``MIN``, ``MED`` (median, rounded down) and ``SM`` (sum modulo 10), written
``[MAX 4 [SM 3 9 ] 1 ]``. Trees are grown to a token budget (at most 10 arguments per operator and 10 levels, as in
LRA); the last few tokens are topped up with digits appended to the outermost list, the only place where an
operator may exceed 10 arguments. Scored by the log-likelihood of the ten digits (chance = 0.1).
"""

from __future__ import annotations

import random
import statistics

from eval.tasks.base import Sample, Task, count_tokens, fit_to_length, top_up

OPERATORS = {
    "MAX": max,
    "MIN": min,
    "MED": lambda args: int(statistics.median(args)),
    "SM": lambda args: sum(args) % 10,
}
MAX_ARGS = 10
MAX_DEPTH = 10
HEADER = (
    "Evaluate the expression. MAX, MIN, MED (median, rounded down) and SM (sum modulo 10) apply to the digits and "
    "sub-expressions in their brackets.\n"
)
FOOTER = "\nThe value of the expression is"

Tree = int | tuple  # a digit, or (operator, [arguments])


def grow(rng: random.Random, atoms: int, depth: int = 1) -> Tree:
    """A random tree of about ``atoms`` operators and digits."""
    if atoms <= 2 or depth >= MAX_DEPTH:
        return rng.randint(0, 9)
    op = rng.choice(list(OPERATORS))
    remaining = atoms - 1
    k = rng.randint(2, min(MAX_ARGS, remaining))
    cuts = sorted(rng.sample(range(1, remaining), k - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, remaining])]
    return op, [grow(rng, size, depth + 1) for size in sizes]


def evaluate(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    return OPERATORS[op]([evaluate(a) for a in args])


def render(tree: Tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    return f"[{op} " + " ".join(render(a) for a in args) + " ]"


class ListOps(Task):
    name = "listops"
    metric = "choice"
    paper = "Tay et al., 2020 (LRA)"

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        seed = rng.getrandbits(64)
        extra = [random.Random(seed + 1).randint(0, 9) for _ in range(length)]

        def tree_of(atoms: int, appended: int = 0) -> Tree:
            tree = grow(random.Random(seed), max(atoms, 3))
            if isinstance(tree, int):
                tree = ("MAX", [tree])
            return tree[0], [*tree[1], *extra[:appended]]

        def build(atoms: int, appended: int = 0) -> str:
            return HEADER + render(tree_of(atoms, appended)) + FOOTER

        per_atom = count_tokens(tokenizer, render(grow(random.Random(seed), 200))) / 200
        guess = int((length - count_tokens(tokenizer, HEADER + FOOTER)) / per_atom)
        atoms, _ = fit_to_length(tokenizer, length, build, guess=guess, name=self.name)
        appended, prompt = top_up(tokenizer, length, lambda m: build(atoms, m), limit=length)
        answer = evaluate(tree_of(atoms, appended))
        choices = [f" {d}" for d in range(10)]
        return Sample(
            prompt, [f" {answer}"], length, variant, choices, {"atoms": atoms, "appended": appended}
        )
