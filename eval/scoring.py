"""Scoring one cell of the suite (task, length, variant) through a predictor.

Multiple-choice accuracy goes through ``evaluate`` with the metric module shipped in ``eval/metrics/`` (loaded
from disk: ``evaluate.load("accuracy")`` would fetch its script from the Hub). RULER's partial-credit string match
fits no ``evaluate`` metric and is computed here.

- ``string_match`` (the rule of RULER, Hsieh et al., 2024): greedy generation; the prediction is the first
  non-empty generated line, normalised (lower case, punctuation to spaces, spaces collapsed); the sample scores
  the fraction of its references found in it as whole words. One reference: exact match of the answer inside the
  line. For ordered answers (selective copying) the single reference is the whole sequence.
- ``choice``: the continuation with the highest mean log-probability per token (length-normalised, so that
  "bathroom" is not penalised against "garden" for its extra tokens) must be ``answers[0]``; chance is
  1 / number of choices.
- ``perplexity``: exp of the total negative log-likelihood over the total number of scored tokens of the cell.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from eval.metrics import load_metric
from eval.predictors import Predictor
from eval.tasks.base import Sample, Task, count_tokens

# Tokens generated beyond the longest reference, room for a separator or a closing word.
GENERATION_SLACK = 8


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line
    return ""


def string_match(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` found as whole words in the first line of ``prediction`` (both normalised)."""
    line = f" {normalize(first_line(prediction))} "
    return sum(f" {normalize(a)} " in line for a in answers) / len(answers)


@dataclass
class CellResult:
    """The score of a cell (accuracy in [0, 1], or perplexity) and one record per sample for predictions.jsonl."""

    score: float
    records: list[dict[str, Any]]


def max_new_tokens(tokenizer, samples: list[Sample]) -> int:
    return max(count_tokens(tokenizer, " " + ", ".join(s.answers)) for s in samples) + GENERATION_SLACK


def score_cell(task: Task, samples: list[Sample], predictor: Predictor, tokenizer) -> CellResult:
    if task.metric == "string_match":
        predictions = predictor.generate([s.prompt for s in samples], max_new_tokens(tokenizer, samples))
        scores = [string_match(p, s.answers) for p, s in zip(predictions, samples)]
        records = [
            {"answers": s.answers, "prediction": p, "score": x}
            for s, p, x in zip(samples, predictions, scores)
        ]
        return CellResult(sum(scores) / len(scores), records)

    if task.metric == "choice":
        contexts = [s.prompt for s in samples for _ in s.choices]
        continuations = [c for s in samples for c in s.choices]
        loglik = predictor.loglikelihood(contexts, continuations)
        records, at = [], 0
        for s in samples:
            means = [total / max(n, 1) for total, n in loglik[at : at + len(s.choices)]]
            at += len(s.choices)
            best = s.choices[max(range(len(means)), key=means.__getitem__)]
            records.append({"answers": s.answers, "prediction": best, "score": float(best == s.answers[0])})
        accuracy = load_metric("choice_accuracy").compute(
            predictions=[r["prediction"] for r in records], references=[s.answers[0] for s in samples]
        )["accuracy"]
        return CellResult(accuracy, records)

    if task.metric == "perplexity":
        loglik = predictor.loglikelihood([s.prompt for s in samples], [s.answers[0] for s in samples])
        nll, tokens = -sum(total for total, _ in loglik), sum(n for _, n in loglik)
        records = [{"scored_tokens": n, "perplexity": math.exp(-total / max(n, 1))} for total, n in loglik]
        return CellResult(math.exp(nll / max(tokens, 1)), records)

    raise ValueError(
        f"task {task.name!r} has metric={task.metric!r}; expected string_match, choice or perplexity"
    )
