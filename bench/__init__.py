"""zoo benchmarks: timings live here, never as assertions in ``tests/``.

``python -m bench`` (or ``zoo-bench``) measures RetNet against the baseline transformer of the same width and
depth: training tokens/s and peak memory per sequence length, and decoding latency per token at short and long
context. See ``bench/README.md`` and :mod:`bench.harness`.
"""

from bench.harness import BenchConfig, format_report, run_benchmark

__all__ = ["BenchConfig", "format_report", "run_benchmark"]
