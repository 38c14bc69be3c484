"""``python -m bench`` / ``zoo-bench``: RetNet against the baseline transformer on this machine.

    python -m bench                                  # the full run: T = 1K..16K, decode at 1K and 16K
    python -m bench --quick                          # tiny sizes, a few seconds
    python -m bench --lengths 1024 4096 --repeats 5 --out bench/results/mine.json
    python -m bench --lengths 2048 --packed-documents 32 --memory off --skip-decode   # packed vs unpacked

Prints a table and writes the JSON (default ``bench/results/retnet_vs_transformer_<timestamp>.json``).
"""

from __future__ import annotations

import argparse
import sys

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
    p = argparse.ArgumentParser(
        prog="zoo-bench",
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    result = run_benchmark(cfg, argv)
    path = write_json(result, args.out or default_out_path())
    print(format_report(result))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
