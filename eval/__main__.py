"""``python -m eval`` / ``zoo-eval``: run the long-context suite on a causal LM and write results, report and plots.

    python -m eval --model PATH --suite quick --lengths 1k,2k,4k --out DIR [--seed 0] [--batch-size 4]
                   [--device cpu] [--rope-scaling yarn:4] [--tasks passkey,mqar] [--num-samples N]

Writes ``DIR/results.json`` (resumable: finished cells are not recomputed), ``DIR/predictions.jsonl``,
``DIR/report.md``, ``DIR/model_index.yaml`` and PNG plots beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from eval.predictors import HFPredictor, load_model, parse_rope_scaling
from eval.report import write_report
from eval.runner import SUITES, run_suite
from eval.tasks import TASKS, get_task

logger = logging.getLogger("eval")


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500 (tokens)."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(float(digits) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"length {text!r} must be a positive token count such as 512, 1k or 32k"
        )
    return value


def parse_lengths(text: str) -> tuple[int, ...]:
    return tuple(parse_length(x) for x in text.split(",") if x.strip())


def parse_tasks(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    for name in names:
        try:
            get_task(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def parse_depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        depths = (-1.0,)
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(
            f"depths {text!r} must be comma-separated fractions in [0, 1], e.g. 0,0.5,1"
        )
    return depths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo-eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local path or Hub id of a causal LM")
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--lengths", type=parse_lengths, help="context lengths in tokens, e.g. 1k,2k,4k")
    parser.add_argument("--out", help="output directory (default: eval_results/<model name>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rope-scaling", metavar="METHOD:FACTOR", help="e.g. yarn:4, linear:2, dynamic:2")
    parser.add_argument(
        "--tasks", type=parse_tasks, help=f"comma-separated tasks (default: the suite's): {', '.join(TASKS)}"
    )
    parser.add_argument("--num-samples", type=int, help="samples per cell (default: the suite's)")
    parser.add_argument(
        "--depths", type=parse_depths, help="needle depths in [0, 1], comma-separated (default: the suite's)"
    )
    parser.add_argument("--label", help="name of this run in reports (default: model name + scaling)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.rope_scaling:
        parse_rope_scaling(args.rope_scaling)  # fail before loading anything

    suite = SUITES[args.suite]
    changes: dict = {}
    if args.lengths:
        changes["lengths"] = args.lengths
    if args.tasks:
        changes["tasks"] = args.tasks
    if args.num_samples:
        changes["num_samples"] = args.num_samples
    if args.depths:
        changes["depths"] = args.depths
    suite = dataclasses.replace(suite, **changes)

    name = Path(args.model.rstrip("/")).name or args.model
    label = args.label or (f"{name} ({args.rope_scaling})" if args.rope_scaling else name)
    out = Path(args.out or os.path.join("eval_results", label.replace(" ", "_").replace("/", "_")))

    model, tokenizer = load_model(args.model, device=args.device, rope_scaling=args.rope_scaling)
    predictor = HFPredictor(model, tokenizer, batch_size=args.batch_size, device=args.device)
    settings = {
        "model": args.model,
        "label": label,
        "suite": args.suite,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "rope_scaling": args.rope_scaling,
        "depths": list(suite.depths),
        "tokenizer": type(tokenizer).__name__,
    }
    run_suite(predictor, tokenizer, suite, out, settings, args.overwrite, not args.no_progress)
    write_report([out], out)
    logger.info("results in %s, report in %s", out / "results.json", out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
