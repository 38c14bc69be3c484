"""The leaderboard's report: ``report.md`` (the table, the reading, the configuration) and its plots.

    python -m eval.leaderboard.report OUT_DIR      # rewrite OUT_DIR/report.md and the PNGs from leaderboard.json

Plots (matplotlib, ``pip install zoo[plots]``; without it the report says so and has tables only):
``accuracy_vs_length.png`` (recall and passkey against length, one line per row), ``perplexity_vs_length.png``,
``quality_vs_speed.png`` (recall at the training length against training tokens/s), ``training_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

SEPARATION = 0.20  # "separates the architectures": best minus worst accuracy in one cell above this


def rows_of(result: dict) -> list[tuple[str, dict, dict | None]]:
    """(row name, quality, the model's record or None for a context-extended row), models first."""
    rows = []
    for name, record in result["models"].items():
        rows.append((name, record["quality"], record))
    for name, record in result["models"].items():
        for label, quality in record.get("extended", {}).items():
            rows.append((f"{name} +{label}", quality, None))
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _get(table: dict, length: int):
    return table.get(length, table.get(str(length)))


def separation(result: dict) -> list[dict]:
    """Per task and length: the best and worst trained model and the spread of their accuracies."""
    out = []
    for task in ("recall", "passkey"):
        for length in result["lengths"]:
            scores = {n: _get(r["quality"][task], length) for n, r in result["models"].items()}
            scores = {n: s for n, s in scores.items() if s is not None}
            if len(scores) < 2:
                continue
            best, worst = max(scores, key=scores.get), min(scores, key=scores.get)
            out.append(
                {
                    "task": task,
                    "length": length,
                    "best": best,
                    "worst": worst,
                    "spread": scores[best] - scores[worst],
                }
            )
    return out


def reading(result: dict) -> list[str]:
    """A few sentences read off the numbers (no claims the table does not hold)."""
    lines = []
    lengths = result["lengths"]
    models = result["models"]
    if not models:
        return ["No model finished."]
    train_len, longest = lengths[0], lengths[-1]
    by_recall = sorted(models, key=lambda n: _get(models[n]["quality"]["recall"], train_len), reverse=True)
    lines.append(
        f"At the training length ({train_len}) recall is best for **{by_recall[0]}** "
        f"({_pct(_get(models[by_recall[0]]['quality']['recall'], train_len))}%) and worst for **{by_recall[-1]}** "
        f"({_pct(_get(models[by_recall[-1]]['quality']['recall'], train_len))}%)."
    )
    # a model at chance (one value among num_values) keeps "half" of nothing: only those well above it count
    chance = 1.0 / result.get("config", {}).get("num_values", 64)
    learnt = [n for n in models if _get(models[n]["quality"]["recall"], train_len) >= 5 * chance]
    held = [
        n
        for n in learnt
        if _get(models[n]["quality"]["recall"], longest)
        >= 0.5 * _get(models[n]["quality"]["recall"], train_len)
    ]
    if held:
        lines.append(
            f"At {longest} tokens ({longest // train_len}x), {', '.join(held)} keep at least half of "
            f"their recall at the training length (of the models above {_pct(5 * chance)}% there, five times "
            "chance)."
        )
    elif learnt:
        lines.append(f"No model keeps half of its recall at {longest} tokens ({longest // train_len}x).")
    else:
        lines.append(
            f"No model recalls above {_pct(5 * chance)}% (five times chance) at the training length."
        )
    sep = separation(result)
    if sep:
        top = max(sep, key=lambda s: s["spread"])
        verdict = "separates" if top["spread"] > SEPARATION else "does not separate"
        lines.append(
            f"The widest gap is {top['task']} at {top['length']}: {_pct(top['spread'])} points between "
            f"{top['best']} and {top['worst']}, so this run {verdict} the architectures by more than "
            f"{SEPARATION * 100:.0f} points."
        )
    fastest = max(models, key=lambda n: models[n]["cost"]["train_tokens_per_s"])
    slowest = min(models, key=lambda n: models[n]["cost"]["train_tokens_per_s"])
    lines.append(
        f"Training throughput ranges from {models[slowest]['cost']['train_tokens_per_s']:,.0f} tokens/s "
        f"({slowest}) to {models[fastest]['cost']['train_tokens_per_s']:,.0f} ({fastest}) at this size; decoding at "
        f"{longest} tokens of context costs "
        + ", ".join(f"{n} {models[n]['cost']['decode_ms_per_token']:.1f}" for n in models)
        + " ms/token."
    )
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def leaderboard_table(result: dict) -> list[str]:
    lengths = result["lengths"]
    header = (
        ["model", "params"]
        + [f"recall@{n}" for n in lengths]
        + [f"passkey@{n}" for n in lengths]
        + [f"ppl@{n}" for n in lengths]
        + ["train tok/s", f"decode ms/tok @{lengths[-1]}", "saved KiB/tok"]
    )
    rows = []
    for name, quality, record in rows_of(result):
        row = [name, f"{record['num_parameters'] / 1e3:.0f}K" if record else "″"]
        row += [_pct(_get(quality["recall"], n)) for n in lengths]
        row += [_pct(_get(quality["passkey"], n)) for n in lengths]
        row += [_num(_get(quality["perplexity"], n), ".2f") for n in lengths]
        if record:
            cost = record["cost"]
            row += [
                f"{cost['train_tokens_per_s']:,.0f}",
                _num(cost["decode_ms_per_token"]),
                _num(cost["saved_for_backward_bytes_per_token"] / 1024),
            ]
        else:
            row += ["″", "″", "″"]
        rows.append(row)
    return _table(header, rows)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


MARKERS = "osD^v<>pPX*h"


def line_styles(result: dict) -> dict[str, dict]:
    """Plot keywords per row: one colour per model (tab20, so a dozen models stay distinct), a marker per model,
    and its context-extended rows in the model's colour, dashed (interpolation) or dotted (others), hollow markers
    for the larger factor."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    styles = {}
    for i, name in enumerate(result["models"]):
        styles[name] = {"color": cmap(i % 20), "marker": MARKERS[i % len(MARKERS)], "linestyle": "-"}
        labels = list(result["models"][name].get("extended", {}))
        factors = [float(label.rpartition("x")[2]) for label in labels]
        for label, factor in zip(labels, factors):
            dash = "--" if label.startswith("linear") else ":"
            style = {**styles[name], "linestyle": dash, "alpha": 0.8}
            if factor > min(factors):
                style["markerfacecolor"] = "none"  # the larger extension: hollow markers
            styles[f"{name} +{label}"] = style
    return styles


def _legend_outside(fig, ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()


def plot_accuracy(result: dict, path: Path, plt) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = line_styles(result)
    for ax, task in zip(axes, ("recall", "passkey")):
        for name, quality, _ in rows_of(result):
            ys = [100 * _get(quality[task], n) for n in result["lengths"]]
            ax.plot(result["lengths"], ys, label=name, **styles[name])
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["lengths"], [str(n) for n in result["lengths"]])
        ax.set_ylim(-3, 103)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{task} accuracy (%)")
        ax.axvline(result["lengths"][0], color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(task)
    _legend_outside(fig, axes[1])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perplexity(result: dict, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    styles = line_styles(result)
    for name, quality, _ in rows_of(result):
        ax.plot(
            result["lengths"],
            [_get(quality["perplexity"], n) for n in result["lengths"]],
            label=name,
            **styles[name],
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(result["lengths"], [str(n) for n in result["lengths"]])
    ax.set_xlabel("context position (tokens)")
    ax.set_ylabel("held-out text perplexity")
    _legend_outside(fig, ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_speed(result: dict, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n0 = result["lengths"][0]
    styles = line_styles(result)
    for name, record in result["models"].items():
        x = record["cost"]["train_tokens_per_s"]
        y = 100 * _get(record["quality"]["recall"], n0)
        ax.scatter([x], [y], color=styles[name]["color"], marker=styles[name]["marker"])
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("training tokens/s")
    ax.set_ylabel(f"recall at {n0} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(result: dict, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    styles = line_styles(result)
    for name, record in result["models"].items():
        losses = record["losses"]
        window = max(1, len(losses) // 50)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(
            range(1, len(losses) + 1),
            smooth,
            label=f"{name} (lr {record['lr']:g})",
            color=styles[name]["color"],
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    _legend_outside(fig, ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {
    "accuracy_vs_length.png": plot_accuracy,
    "perplexity_vs_length.png": plot_perplexity,
    "quality_vs_speed.png": plot_quality_vs_speed,
    "training_curves.png": plot_training_curves,
}


def write_report(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    path = out / "leaderboard.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m eval.leaderboard --out {out}` first")
    result = json.loads(path.read_text())
    cfg = result["config"]
    lines = [
        "# zoo long-context leaderboard",
        "",
        f"Every model: {result['steps']} steps of {cfg['batch_size']} x {cfg['train_length']} tokens "
        f"({result['tokens_per_model']:,} tokens), the same batches, AdamW with a cosine schedule, the best "
        f"learning rate of {cfg['lrs']}; widths matched to within {cfg['param_tolerance']:.0%} of the reference's "
        f"parameter count at depth {cfg['num_layers']}. Evaluated at {', '.join(map(str, result['lengths']))} "
        f"tokens ({'x, '.join(map(str, cfg['eval_multiples']))}x the training length).",
        "",
        "recall: multi-query associative recall with "
        f"{cfg['eval_pairs']} single-token key-value pairs, then text up to the length, then every key asked again "
        "(accuracy per queried value, %). passkey: 3 tokens hidden in text at depths "
        f"{cfg['passkey_depths']}, retrieved exactly (%). ppl: held-out text perplexity over the positions "
        "(n/2, n]. Rows `+linearxF` / `+yarnxF` are a rotary model evaluated with its context extended F times "
        "(position interpolation, YaRN), without further training. saved KiB/tok: activation bytes a training "
        "step saves for backward, per token.",
        "",
        *leaderboard_table(result),
        "",
        "## Reading",
        "",
        *[f"- {line}" for line in reading(result)],
        "",
    ]
    plt = _plt()
    if plt is None:
        lines += ["(matplotlib is not installed, `pip install zoo[plots]`: no plots.)", ""]
    else:
        lines += ["## Plots", ""]
        for name, plot in PLOTS.items():
            plot(result, out / name, plt)
            lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    lines += ["## Learning-rate sweep", ""]
    lines += _table(
        ["model", "width", "lr", "validation loss"],
        [
            [
                n,
                str(r["hidden_size"]),
                f"{s['lr']:g}" + (" (kept)" if s["lr"] == r["lr"] else ""),
                _num(s["validation_loss"], ".4f"),
            ]
            for n, r in result["models"].items()
            for s in r["sweep"]
        ],
    )
    lines += ["", "## Passkey by depth", ""]
    depths = [f"{d:g}" for d in cfg["passkey_depths"]]
    prow = []
    for name, quality, _ in rows_of(result):
        for n in result["lengths"]:
            by_depth = _get(quality["passkey_by_depth"], n)
            prow.append([name, str(n), *[_pct(by_depth.get(d)) for d in depths]])
    lines += _table(["model", "length", *[f"depth {d}" for d in depths]], prow)
    lines += [
        "",
        "## Models",
        "",
        *[
            f"- `{r['saved_to']}`: {n}, width {r['hidden_size']}, {r['num_parameters']:,} parameters "
            f"(`AutoModelForCausalLM.from_pretrained` after `import zoo`)"
            for n, r in result["models"].items()
        ],
        "",
        "## Configuration",
        "",
        f"`{result['command'].strip()}`, {result.get('wall_time_s', 0) / 60:.1f} minutes, "
        f"{result['torch_threads']} torch threads.",
        "",
        "```json",
        json.dumps(cfg, indent=1),
        "```",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.leaderboard.report", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="a folder written by python -m eval.leaderboard")
    args = p.parse_args(argv)
    print(write_report(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
