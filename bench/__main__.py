"""``python -m bench`` / ``zoo-bench``: every architecture's entry through the same workloads (:mod:`bench.suite`),
and ``python -m bench retnet``: RetNet against the baseline transformer in detail (:mod:`bench.harness`).

    python -m bench --quick                          # every entry, tiny sizes: a few minutes on 2 CPUs
    python -m bench                                  # every entry at its issue's lengths (hidden 256, 4 layers)
    python -m bench --entries mamba retnet --lengths 1024 4096 --batch-sizes 1 4
    python -m bench retnet                           # the RetNet pair: T = 1K..16K, decode at 1K and 16K
    python -m bench retnet --quick                   # tiny sizes, a few seconds
    python -m bench retnet --lengths 2048 --packed-documents 32 --memory off --skip-decode   # packed vs unpacked

The suite writes ``result.json``, ``table.md`` and ``plots/*.png`` under ``bench/results/suite_<timestamp>/`` (or
``--out-dir``); ``retnet`` prints a table and writes one JSON (default
``bench/results/retnet_vs_transformer_<timestamp>.json``). Results recorded before the suite existed with
``python -m bench ...`` are ``python -m bench retnet ...`` now.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.harness import RETNET_FFN, BenchConfig, default_out_path, format_report, run_benchmark, write_json

QUICK = {
    "lengths": [64, 128, 256],
    "hidden_size": 64,
    "layers": 2,
    "heads": 2,
    "chunk_size": 16,
    "packed_documents": 4,
    "repeats": 2,
    "warmup": 1,
    "decode_contexts": [64, 256],
    "decode_steps": 4,
    "decode_warmup": 1,
    "memory": "shared",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m bench retnet``."""
    p = argparse.ArgumentParser(
        prog="zoo-bench retnet",
        description="Training throughput, peak memory and decoding latency of RetNet vs the baseline transformer "
        "of the same width and depth, measured interleaved in one process.",
    )
    d = BenchConfig.__dataclass_fields__
    p.add_argument(
        "--lengths", type=int, nargs="+", help="training sequence lengths (default 1024 ... 16384)"
    )
    p.add_argument(
        "--hidden-size", type=int, help=f"width of both models (default {d['hidden_size'].default})"
    )
    p.add_argument("--layers", type=int, help=f"depth of both models (default {d['layers'].default})")
    p.add_argument("--heads", type=int, help=f"attention / retention heads (default {d['heads'].default})")
    p.add_argument(
        "--intermediate-size", type=int, help="the transformer's feed-forward width (default 2 * hidden)"
    )
    p.add_argument(
        "--retnet-ffn",
        choices=list(RETNET_FFN),
        help="RetNet's feed-forward width: 'matched' (default) narrows it until both models have the same "
        "parameter count, the RetNet paper's allocation; 'equal' makes it as wide as the transformer's",
    )
    p.add_argument("--vocab-size", type=int, help="vocabulary (default 259, the byte tokenizer)")
    p.add_argument("--chunk-size", type=int, help="RetNet retention chunk size (default 64)")
    p.add_argument("--repeats", type=int, help="timed repeats per length / context (default 3)")
    p.add_argument(
        "--packed-documents",
        type=int,
        help="also time each training length as this many packed documents of the same total length "
        f"(position_ids restarting at 0); 0: off (default {d['packed_documents'].default})",
    )
    p.add_argument("--warmup", type=int, help="untimed training steps per model and length (default 1)")
    p.add_argument("--decode-contexts", type=int, nargs="+", help="prefill lengths (default 1024 16384)")
    p.add_argument("--decode-steps", type=int, help="timed single-token steps per block (default 32)")
    p.add_argument("--decode-warmup", type=int, help="untimed steps after each prefill (default 4)")
    p.add_argument(
        "--memory",
        choices=["per-run", "per-model", "shared", "off"],
        help="process isolation of the peak-memory measurement: a fresh process per (model, length) "
        "(per-run, the default), per model, one for all (shared), or no memory measurement",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="where both models run (default cpu; cuda: RetNet's retention runs its Triton kernels)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default for this machine)")
    p.add_argument("--seed", type=int, help="seed of weights and inputs (default 0)")
    p.add_argument("--skip-train", action="store_true", help="no training throughput / memory")
    p.add_argument("--skip-decode", action="store_true", help="no decoding measurement")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both models for the training steps (compiled in the warm-up); memory and decoding "
        "stay eager",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny models and lengths (smoke test); flags still override"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--out", help="JSON output path (default bench/results/retnet_vs_transformer_<time>.json)")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = dict(QUICK) if args.quick else {}
    for name in BenchConfig.__dataclass_fields__:
        given = getattr(args, name, None)
        if given is not None and given is not False:
            values[name] = given
    values["progress"] = not args.no_progress
    return BenchConfig(**values)


def retnet_main(argv: list[str]) -> int:
    """``python -m bench retnet ...``: the RetNet / transformer pair (:mod:`bench.harness`)."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    result = run_benchmark(cfg, ["retnet", *argv])
    path = write_json(result, args.out or default_out_path())
    print(format_report(result))
    print(f"\nresults written to {path}")
    return 0


def build_suite_parser() -> argparse.ArgumentParser:
    from bench.suite import SuiteConfig

    d = SuiteConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="zoo-bench",
        description="Every architecture's bench entry (bench/entries/) through the same workloads: training "
        "tokens/s and MFU, prefill, decoding per context, peak memory and saved-for-backward bytes, a time "
        "profile, scaling exponents and plots. 'python -m bench retnet --help': the RetNet pair harness.",
    )
    p.add_argument("--entries", nargs="+", help="entry names (default: all; see bench/entries/)")
    p.add_argument("--hidden-size", type=int, help=f"width (default {d['hidden_size'].default})")
    p.add_argument("--layers", type=int, help=f"depth (default {d['layers'].default})")
    p.add_argument(
        "--lengths", type=int, nargs="+", help="training/prefill lengths (default: each entry's own)"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", help="training batch sizes (default 1)")
    p.add_argument("--decode-contexts", type=int, nargs="+", help="decode after these contexts (1K 4K 16K)")
    p.add_argument("--decode-steps", type=int, help="timed decode steps per context (default 16)")
    p.add_argument("--repeats", type=int, help="interleaved timed repeats (default 3)")
    p.add_argument("--warmup", type=int, help="untimed training steps per shape (default 1)")
    p.add_argument("--memory", choices=["per-entry", "shared", "off"], help="memory probe processes")
    p.add_argument("--profile-length", type=int, help="T of the time profile (default 2048; 0: none)")
    p.add_argument("--peak-size", type=int, help="matrix size of the matmul-peak measurement (default 2048)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: CUDA (Triton, bf16) when present")
    p.add_argument(
        "--reference-max-length",
        type=int,
        help="time references only up to this T (zoo at every length: scaling to 64K without a quadratic reference)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory in the process for both models (no page faults on every step at long T)",
    )
    p.add_argument("--seed", type=int, help="weights and inputs (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for every entry; flags still override")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--out-dir", help="output folder (default bench/results/suite_<time>/)")
    return p


def suite_config_from_args(args: argparse.Namespace):
    from bench.suite import QUICK, SuiteConfig

    values = dict(QUICK) if args.quick else {}
    for name in SuiteConfig.__dataclass_fields__:
        given = getattr(args, name, None)
        if given is not None and given is not False:
            values[name] = given
    if values.get("profile_length") == 0:
        values["profile_length"] = None
    values["plots"] = not args.no_plots
    values["progress"] = not args.no_progress
    return SuiteConfig(**values)


def suite_main(argv: list[str]) -> int:
    from pathlib import Path

    from bench.plots import write_plots
    from bench.report import format_markdown
    from bench.suite import default_out_dir, run_suite

    args = build_suite_parser().parse_args(argv)
    cfg = suite_config_from_args(args)
    started = time.perf_counter()
    progress = None
    if cfg.progress:
        progress = lambda text: print(
            f"[{time.perf_counter() - started:6.1f}s] {text}", file=sys.stderr, flush=True
        )
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir()

    def checkpoint(partial: dict) -> None:  # after each entry: a stopped run keeps what it measured
        write_json(partial, out_dir / "result.json")
        (out_dir / "table.md").write_text(format_markdown(partial) + "\n")

    result = run_suite(cfg, argv, progress, on_entry=checkpoint)
    plots = write_plots(result, out_dir / "plots") if cfg.plots else []
    result["plots"] = [str(p.relative_to(out_dir)) for p in plots]
    table = format_markdown(result)
    write_json(result, out_dir / "result.json")
    (out_dir / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nresults written to {out_dir}")
    failed = sorted(name for name, e in result["entries"].items() if "error" in e)
    if failed:
        print(f"entries that failed (see their 'error' in result.json): {failed}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["retnet"]:
        return retnet_main(argv[1:])
    return suite_main(argv)


if __name__ == "__main__":
    sys.exit(main())
