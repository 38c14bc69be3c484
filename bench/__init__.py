"""zoo benchmarks: timings live here, never as assertions in ``tests/``.

``python -m bench`` (or ``zoo-bench``) runs every architecture's entry (:mod:`bench.registry`, ``bench/entries/``)
through the same workloads (:mod:`bench.suite`); ``python -m bench retnet`` measures RetNet against the baseline
transformer of the same width and depth in detail (:mod:`bench.harness`). See ``bench/README.md`` and
``BENCHMARKS.md``.
"""

from bench.harness import BenchConfig, format_report, run_benchmark

__all__ = ["BenchConfig", "format_report", "run_benchmark"]
