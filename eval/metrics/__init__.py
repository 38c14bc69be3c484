"""``evaluate`` metric modules shipped with the suite, loaded from disk so that scoring works offline."""

from __future__ import annotations

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


@functools.cache
def load_metric(name: str):
    """``evaluate.load`` of the metric module ``eval/metrics/<name>/<name>.py`` (no network)."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no metric {name!r} in {METRICS_DIR}; known: {known}")
    return evaluate.load(str(path))
