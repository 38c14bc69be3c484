"""Reports of one or more suite runs: markdown tables, PNG plots and a Hugging Face ``model-index`` block.

    python -m eval.report DIR1 [DIR2 ...] --out DIR

reads each ``DIRi/results.json`` (written by ``python -m eval``) and writes into ``DIR``:

- ``report.md``: the runs, a summary table per run (task × length, mean over depths/variants), perplexity by
  length, per-task tables (variant × length), skipped cells, and the model-index block;
- ``heatmap_<task>[_<run>].png``: depth × length accuracy of the needle tasks (passkey, niah_*);
- ``accuracy_vs_length.png``: one panel per task, one line per run, chance level dashed;
- ``perplexity_vs_length.png``: one line per run (per model, or per RoPE scaling method of one model);
- ``model_index.yaml``: the ``model-index`` metadata of a model card (one entry per run).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)


def load_run(directory: str | Path) -> dict:
    path = Path(directory) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `python -m eval --out {directory}` first")
    return json.loads(path.read_text())


def format_length(length: int) -> str:
    if length % (1024 * 1024) == 0:
        return f"{length // (1024 * 1024)}M"
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def lengths_of(run: dict, task: str) -> list[int]:
    return sorted(int(k) for k in run["results"].get(task, {}))


def variants_of(run: dict, task: str) -> list[str]:
    seen: list[str] = []
    for cells in run["results"].get(task, {}).values():
        seen += [v for v in cells if v not in seen]
    kind = run["tasks"].get(task, {}).get("variant_kind")
    return sorted(seen, key=float) if kind == "depth" else seen


def cell(run: dict, task: str, length: int, variant: str) -> float | None:
    return run["results"].get(task, {}).get(str(length), {}).get(variant)


def mean_score(run: dict, task: str, length: int) -> float | None:
    values = [v for v in run["results"].get(task, {}).get(str(length), {}).values() if v is not None]
    if not values:
        return None
    if run["tasks"].get(task, {}).get("metric") == "perplexity":
        return math.exp(sum(math.log(v) for v in values) / len(values))
    return sum(values) / len(values)


def is_perplexity(run: dict, task: str) -> bool:
    return run["tasks"].get(task, {}).get("metric") == "perplexity"


def _fmt(value: float | None, perplexity: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if perplexity else f"{100 * value:.1f}"


def corpus_label(run: dict) -> str:
    """The real-text corpus a run's haystacks and perplexity read, as recorded by the runner; "–" if none."""
    corpus = run.get("corpus")
    if not corpus:
        return "–"
    return f"`{corpus['name']}` ({corpus['documents']} documents, sha256 {corpus['sha256']})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def model_index(runs: list[dict]) -> dict:
    """The ``model-index`` of a model card: per run, one result per task with a metric per context length."""
    entries = []
    for run in runs:
        results = []
        for task, info in run["tasks"].items():
            metrics = []
            for length in lengths_of(run, task):
                value = mean_score(run, task, length)
                if value is not None:
                    metric = info.get("metric", "accuracy")
                    name = f"{metric} @ {format_length(length)} tokens"
                    metrics.append({"type": metric, "value": round(value, 4), "name": name})
            if metrics:
                results.append(
                    {
                        "task": {"type": "text-generation", "name": "Long-context evaluation"},
                        "dataset": {
                            "type": f"zoo-eval/{task}",
                            "name": task,
                            "config": "corpus-test" if info.get("metric") == "perplexity" else "synthetic",
                        },
                        "metrics": metrics,
                    }
                )
        entries.append({"name": run.get("label") or run.get("model"), "results": results})
    return {"model-index": entries}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install zoo[plots]); the report will have no plots")
        return None
    return plt


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.minorticks_off()


def plot_heatmap(run: dict, task: str, path: Path) -> bool:
    plt = _plt()
    lengths, depths = lengths_of(run, task), variants_of(run, task)
    if plt is None or not lengths or not depths:
        return False
    grid = [[cell(run, task, n, d) for n in lengths] for d in depths]
    values = [[math.nan if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{task} — {run.get('label')}", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_accuracy(runs: list[dict], tasks: list[str], path: Path) -> bool:
    plt = _plt()
    if plt is None or not tasks:
        return False
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for run in runs:
            points = [(n, mean_score(run, task, n)) for n in lengths_of(run, task)]
            points = [(n, v) for n, v in points if v is not None]
            if points:
                ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=run.get("label"))
        chance = next((r["tasks"][task].get("chance") for r in runs if task in r["tasks"]), None)
        if chance:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8)
        _length_axis(ax, sorted({n for r in runs for n in lengths_of(r, task)}))
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_perplexity(runs: list[dict], task: str, path: Path) -> bool:
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for run in runs:
        points = [(n, mean_score(run, task, n)) for n in lengths_of(run, task)]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=run.get("label"))
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    _length_axis(ax, sorted({n for r in runs for n in lengths_of(r, task)}))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of the last tokens")
    ax.set_title("Perplexity vs context length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def all_zero_tasks(runs: list[dict], tasks: list[str]) -> list[tuple[str, str, str]]:
    """(run, task, explanation) for every accuracy task a run scored 0 on in every cell it scored.

    A zero everywhere is either a weak model or a broken path (a cache ignored, a tokenizer mismatch); the
    explanation says which the run can rule out: the decoding self-check the runner records tells whether
    cached decoding was verified against the full forward.
    """
    out = []
    for run in runs:
        check = run.get("decoding_check") or {}
        if check.get("checked"):
            why = (
                "cached decoding was verified against the full forward before scoring "
                f"(relative logit error {check.get('logits_relative_error', float('nan')):.1e}): the model, not "
                "the decoding path, scored 0"
            )
        else:
            reason = check.get("reason", "this run has no record of it")
            why = f"**decoding path not verified** ({reason}): a broken path cannot be ruled out"
        for task in tasks:
            scores = [
                s for by_v in run["results"].get(task, {}).values() for s in by_v.values() if s is not None
            ]
            if scores and all(s == 0 for s in scores):
                out.append((str(run.get("label")), task, why))
    return out


def revision_mismatches(runs: list[dict], tasks: list[str]) -> list[str]:
    """One line per task that the runs scored with different revisions of its generator (a record without one:
    revision 1), whose scores therefore come from other prompts."""
    lines = []
    for task in tasks:
        revisions = {str(r.get("label")): r["tasks"][task].get("revision", 1) for r in runs if task in r["tasks"]}
        if len(set(revisions.values())) > 1:
            listed = ", ".join(f"{label} revision {rev}" for label, rev in revisions.items())
            lines.append(f"- {task}: {listed}")
    return lines


def write_report(directories: list[str | Path], out: str | Path) -> Path:
    """Write report.md, model_index.yaml and the plots of the runs in ``directories`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in directories]
    labels = [str(r.get("label") or r.get("model")) for r in runs]
    for run, directory, label in zip(runs, directories, labels):
        # two runs with one label (same model, same scaling) are told apart by their directories
        run["label"] = f"{label} [{Path(directory).name}]" if labels.count(label) > 1 else label
    tasks: list[str] = []
    for run in runs:
        tasks += [t for t in run["tasks"] if t not in tasks]
    ppl_tasks = [t for t in tasks if any(is_perplexity(r, t) for r in runs)]
    acc_tasks = [t for t in tasks if t not in ppl_tasks]
    depth_tasks = [
        t for t in acc_tasks if any(r["tasks"].get(t, {}).get("variant_kind") == "depth" for r in runs)
    ]

    lines = ["# Long-context evaluation", ""]
    lines += _table(
        ["run", "model", "suite", "seed", "RoPE scaling", "samples / cell", "real text"],
        [
            [
                str(r.get("label")),
                f"`{r.get('model')}`",
                str(r["settings"].get("suite")),
                str(r["settings"].get("seed")),
                str(r["settings"].get("rope_scaling") or "–"),
                str(r["settings"].get("num_samples")),
                corpus_label(r),
            ]
            for r in runs
        ],
    )
    lines += [
        "",
        "Accuracy in %, mean over needle depths or variants; perplexity of the last tokens of each window.",
        "",
    ]
    mismatched = revision_mismatches(runs, tasks)
    if mismatched:
        lines += [
            "## Tasks scored on other prompts",
            "",
            "These runs scored these tasks with different revisions of their generators: their scores are not",
            "comparable (rescore the older run).",
            "",
            *mismatched,
            "",
        ]

    for run in runs:
        lengths = sorted({n for t in acc_tasks for n in lengths_of(run, t)})
        if not lengths:
            continue
        lines += [f"## Summary — {run.get('label')}", ""]
        rows = [
            [t, _fmt(run["tasks"][t].get("chance", 0.0)), *(_fmt(mean_score(run, t, n)) for n in lengths)]
            for t in acc_tasks
            if t in run["results"]
        ]
        lines += _table(["task", "chance", *(format_length(n) for n in lengths)], rows) + [""]

    for task in ppl_tasks:
        lengths = sorted({n for r in runs for n in lengths_of(r, task)})
        lines += [f"## Perplexity ({task})", ""]
        rows = [[str(r.get("label")), *(_fmt(mean_score(r, task, n), True) for n in lengths)] for r in runs]
        lines += _table(["run", *(format_length(n) for n in lengths)], rows) + [""]

    lines += ["## Plots", ""]
    if plot_perplexity(runs, ppl_tasks[0], out / "perplexity_vs_length.png") if ppl_tasks else False:
        lines += ["![perplexity vs length](perplexity_vs_length.png)", ""]
    if plot_accuracy(runs, acc_tasks, out / "accuracy_vs_length.png"):
        lines += ["![accuracy vs length](accuracy_vs_length.png)", ""]
    for task in depth_tasks:
        for i, run in enumerate(runs):
            suffix = "" if len(runs) == 1 else f"_{i}_{_slug(str(run.get('label')))}"
            name = f"heatmap_{task}{suffix}.png"
            if task in run["results"] and plot_heatmap(run, task, out / name):
                lines += [f"![{task} heatmap, {run.get('label')}]({name})", ""]

    lines += ["## Per task", ""]
    for run in runs:
        for task in tasks:
            if task not in run["results"]:
                continue
            lengths = lengths_of(run, task)
            perplexity = is_perplexity(run, task)
            paper = run["tasks"].get(task, {}).get("paper", "")
            lines += [f"### {task} — {run.get('label')}", ""] + (
                [f"Reference: {paper}.", ""] if paper else []
            )
            rows = [
                [v, *(_fmt(cell(run, task, n, v), perplexity) for n in lengths)]
                for v in variants_of(run, task)
            ]
            kind = run["tasks"].get(task, {}).get("variant_kind", "variant")
            lines += _table([kind, *(format_length(n) for n in lengths)], rows) + [""]

    zero = all_zero_tasks(runs, acc_tasks)
    if zero:
        lines += ["## Tasks scored 0 on every cell", ""]
        lines += [f"- {label}: {task} — {why}" for label, task, why in zero] + [""]

    skipped = [
        f"- {r.get('label')}: {t} @ {n} [{v}]: {reason}"
        for r in runs
        for t, by_length in r.get("skipped", {}).items()
        for n, by_variant in by_length.items()
        for v, reason in by_variant.items()
    ]
    if skipped:
        lines += ["## Skipped cells", "", *skipped, ""]

    index = model_index(runs)
    index_yaml = yaml.safe_dump(index, sort_keys=False, allow_unicode=True)
    (out / "model_index.yaml").write_text(index_yaml)
    lines += ["## model-index", "", "For the YAML header of a Hugging Face model card:", "", "```yaml"]
    lines += [index_yaml.rstrip(), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.report", description="Merge suite runs into one report."
    )
    parser.add_argument("dirs", nargs="+", help="result directories (each with a results.json)")
    parser.add_argument("--out", required=True, help="where report.md, plots and model_index.yaml go")
    args = parser.parse_args(argv)
    path = write_report(args.dirs, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
