"""Scaling plots of a suite result (:mod:`bench.suite`), log-log, one line per entry, the fitted exponent in the
legend: training-step time and peak memory (and bytes saved for backward) against sequence length, decoding time
per token against context. matplotlib with the Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path

from bench.harness import median


def _lines(result: dict, points, exponent_key: str | None):
    for name, entry in result["entries"].items():
        xs, ys = points(entry)
        if len(xs) >= 1:
            exponent = (entry.get("fits") or {}).get(exponent_key) if exponent_key else None
            label = name + (f" (T^{exponent:.2f})" if exponent is not None else "")
            yield name, xs, ys, label


def _train_points(entry):
    rows = [r for r in entry.get("train", []) if r["batch"] == 1]
    return [r["seq_len"] for r in rows], [median(r["zoo_step_s"]) for r in rows]


def _memory_points(entry):
    mem = entry.get("memory") or []
    return [m["seq_len"] for m in mem], [m["peak_bytes"] / 2**20 for m in mem]


def _saved_points(entry):
    mem = entry.get("memory") or []
    return [m["seq_len"] for m in mem], [m["saved_for_backward_bytes"] / 2**20 for m in mem]


def _decode_points(entry):
    per = (entry.get("decode") or {}).get("zoo") or []
    return [d["context"] for d in per], [d["ms_per_token_median"] for d in per]


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h")
PANELS = {
    "train_time": (_train_points, "train_time_exponent", "training step (s), batch 1", "sequence length T"),
    "peak_memory": (_memory_points, "peak_memory_exponent", "peak memory of a step (MiB)", "sequence length T"),
    "saved_for_backward": (
        _saved_points, "saved_for_backward_exponent", "saved for backward (MiB)", "sequence length T",
    ),
    "decode": (_decode_points, "decode_time_exponent", "decode (ms / token)", "context length"),
}  # fmt: skip


def write_plots(result: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per panel of :data:`PANELS` that has data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, (points, exponent_key, ylabel, xlabel) in PANELS.items():
        lines = list(_lines(result, points, exponent_key))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        for i, (_name, xs, ys, label) in enumerate(lines):
            # ten colours, then the next ten dashed with other markers: every line stays distinguishable
            style = {"marker": MARKERS[i % len(MARKERS)], "linestyle": "-" if i < 10 else "--"}
            ax.plot(xs, ys, color=f"C{i % 10}", label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {xlabel} ({result['device']}, {result['dtype']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{panel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["PANELS", "write_plots"]
