"""Running a suite: cells (task, length, variant) are generated, scored and written to ``DIR/results.json``.

``results.json`` is rewritten atomically after every cell, so an interrupted run resumes where it stopped: a cell
already present (scored, or skipped with a reason) is not recomputed. Predictions of every sample are appended to
``DIR/predictions.jsonl`` for inspection. Layout of results.json::

    {"model": ..., "label": ..., "settings": {...},
     "tasks":   {task: {"metric": ..., "variant_kind": "depth" | "variant", "paper": ...}},
     "results": {task: {"1024": {"0.50": 0.75, ...}, ...}, ...},     # accuracy in [0, 1], or perplexity
     "samples": {task: {"1024": {"0.50": 4}}},                        # samples per cell
     "skipped": {task: {"1024": {"default": "reason"}}},              # cells that could not be built
     "decoding_check": {"checked": true, "tokens_equal": true, "logits_relative_error": 1e-7},
     "corpus": {"name": "zoo.data.corpus:test", "documents": 120, "sha256": ...}}  # when a task reads real text

The real text that haystacks and perplexity read is identified in ``corpus``; a resumed run reading other text
stops with a ``ValueError`` instead of mixing scores of two corpora. Likewise each task's ``revision`` (its
generator's, ``Task.revision``; 1 where a record has none): a task scored at another revision is not resumed.

Before any cell is scored, a predictor that has ``check_decoding`` (``HFPredictor``) checks that its cached
decoding equals its full forward on a short prompt; when it does not, the run stops with
``DecodingCheckFailed`` before writing a score.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.predictors import Predictor
from eval.scoring import score_cell
from eval.tasks import TASKS, CellSkipped, Task, get_task
from eval.tasks.text import real_text_corpus

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
# Settings that change what a cell's score means: a resumed run must agree on them.
RESUME_KEYS = ("model", "seed", "num_samples", "rope_scaling")


@dataclass(frozen=True)
class Suite:
    """Which cells a suite evaluates; ``variants`` narrows a task's own variant list."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    num_samples: int
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)


SUITES = {
    # a CPU smoke run of every task family: a couple of minutes on a tiny model
    "quick": Suite(
        tasks=(
            "passkey",
            "niah_single_noise",
            "niah_multikey_essay",
            "vt",
            "cwe",
            "fwe",
            "mqar",
            "selective_copy",
            "babi_qa1",
            "babi_qa2",
            "babi_qa3",
            "listops",
            "perplexity",
        ),
        lengths=(512, 1024),
        depths=(0.0, 0.5, 1.0),
        num_samples=4,
        variants={"vt": ("h2",), "mqar": ("q4",), "selective_copy": ("n4",)},
    ),  # fmt: skip
    "standard": Suite(
        tasks=tuple(TASKS),
        lengths=(1024, 2048, 4096, 8192),
        depths=(0.0, 0.25, 0.5, 0.75, 1.0),
        num_samples=20,
    ),
    "full": Suite(
        tasks=tuple(TASKS),
        lengths=(1024, 2048, 4096, 8192, 16384, 32768),
        depths=tuple(i / 10 for i in range(11)),
        num_samples=50,
    ),
}


def cells(suite: Suite) -> list[tuple[Task, int, str]]:
    out = []
    for name in suite.tasks:
        task = get_task(name)
        for length in suite.lengths:
            for variant in suite.variants.get(name) or task.variants(length, list(suite.depths)):
                out.append((task, length, variant))
    return out


def load_results(out: Path, settings: dict, overwrite: bool = False) -> dict:
    """The results of ``out`` to resume from, or a fresh record; refuses to mix runs of different settings."""
    path = out / RESULTS_FILE
    if path.exists() and not overwrite:
        results = json.loads(path.read_text())
        for key in RESUME_KEYS:
            if results["settings"].get(key) != settings.get(key):
                raise ValueError(
                    f"{path} was written with {key}={results['settings'].get(key)!r}, this run has "
                    f"{key}={settings.get(key)!r}; pass --overwrite or choose another --out"
                )
        results["settings"].update({k: v for k, v in settings.items() if k not in ("lengths", "tasks")})
        for key in ("lengths", "tasks"):
            merged = list(results["settings"].get(key, []))
            merged += [x for x in settings.get(key, []) if x not in merged]
            results["settings"][key] = merged
        return results
    if overwrite and (out / PREDICTIONS_FILE).exists():
        (out / PREDICTIONS_FILE).unlink()
    return {
        "model": settings.get("model"),
        "label": settings.get("label") or settings.get("model"),
        "settings": settings,
        "tasks": {},
        "results": {},
        "samples": {},
        "skipped": {},
    }


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
    os.replace(tmp, path)


def is_done(results: dict, task: str, length: int, variant: str) -> bool:
    return variant in results["results"].get(task, {}).get(str(length), {})


def run_suite(
    predictor: Predictor,
    tokenizer,
    suite: Suite,
    out: str | os.PathLike,
    settings: dict,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score every cell of ``suite`` not yet in ``out/results.json``; returns the full results record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "num_samples": suite.num_samples, "lengths": list(suite.lengths)}
    settings["tasks"] = list(suite.tasks)
    results = load_results(out, settings, overwrite)
    todo = [c for c in cells(suite) if not is_done(results, c[0].name, c[1], c[2])]
    if todo and hasattr(predictor, "check_decoding"):
        # raises before any score is written when the cached path is broken
        results["decoding_check"] = predictor.check_decoding()
        logger.info("decoding self-check: %s", results["decoding_check"])
    if any(task.uses_real_text for task, _, _ in todo):
        corpus = real_text_corpus()
        if results.get("corpus") not in (None, corpus):
            raise ValueError(
                f"{out / RESULTS_FILE} was scored on the real-text corpus {results['corpus']}, this run reads "
                f"{corpus}; pass --overwrite or choose another --out"
            )
        results["corpus"] = corpus
    for task in {task for task, _, _ in todo}:
        scored = results["tasks"].get(task.name)
        if scored is not None and scored.get("revision", 1) != task.revision:
            raise ValueError(
                f"{out / RESULTS_FILE} scored {task.name} with revision {scored.get('revision', 1)} of its "
                f"generator, this run has revision {task.revision} (other prompts); pass --overwrite or choose "
                "another --out"
            )
    seed = settings.get("seed", 0)
    torch.manual_seed(seed)
    bar = tqdm(todo, desc="eval", unit="cell", disable=not progress)
    for task, length, variant in bar:
        bar.set_postfix_str(f"{task.name} @ {length} [{variant}]")
        results["tasks"].setdefault(task.name, {}).update(
            {
                "metric": "perplexity" if task.metric == "perplexity" else "accuracy",
                "scoring": task.metric,
                "variant_kind": task.variant_kind,
                "paper": task.paper,
                "uses_real_text": task.uses_real_text,
                "revision": task.revision,
            }
        )
        key = str(length)
        started = time.perf_counter()
        try:
            samples = task.samples(tokenizer, length, variant, suite.num_samples, seed)
        except CellSkipped as err:
            logger.warning("skipping %s @ %d [%s]: %s", task.name, length, variant, err)
            results["results"].setdefault(task.name, {}).setdefault(key, {})[variant] = None
            results["skipped"].setdefault(task.name, {}).setdefault(key, {})[variant] = str(err)
            write_json_atomic(out / RESULTS_FILE, results)
            continue
        if samples[0].choices:
            results["tasks"][task.name]["chance"] = 1.0 / len(samples[0].choices)
        cell = score_cell(task, samples, predictor, tokenizer)
        results["results"].setdefault(task.name, {}).setdefault(key, {})[variant] = cell.score
        results["samples"].setdefault(task.name, {}).setdefault(key, {})[variant] = len(samples)
        write_json_atomic(out / RESULTS_FILE, results)
        with open(out / PREDICTIONS_FILE, "a") as f:
            for record in cell.records:
                line = {"task": task.name, "length": length, "variant": variant, **record}
                f.write(json.dumps(line) + "\n")
        logger.info(
            "%s @ %d [%s]: %.4f (%.1fs)",
            task.name,
            length,
            variant,
            cell.score,
            time.perf_counter() - started,
        )
    return results
