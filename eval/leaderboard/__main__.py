"""``python -m eval.leaderboard``: train every architecture at one size, evaluate, write the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.leaderboard.run import LeaderboardConfig, run_leaderboard
from eval.leaderboard.tasks import Mixture


def build_parser() -> argparse.ArgumentParser:
    d = LeaderboardConfig()
    p = argparse.ArgumentParser(
        prog="python -m eval.leaderboard",
        description="Train every registered causal architecture at one size on one mixture (text, MQAR, passkey), "
        "evaluate all of them at 1x..8x the training length, and write report.md, plots, JSON and the models.",
    )
    p.add_argument("--out", default="outputs/leaderboard", help="output folder (default outputs/leaderboard)")
    p.add_argument(
        "--architectures",
        nargs="+",
        metavar="TYPE[:k=v,...]",
        help="model types, with config overrides after a colon (default: every registered one)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=d.budget_minutes,
        help=f"minutes for the whole run on this machine (default {d.budget_minutes:g})",
    )
    p.add_argument("--steps", type=int, help="training steps per model instead of the budget's")
    p.add_argument("--train-length", type=int, default=d.train_length, help=f"default {d.train_length}")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        metavar="MULTIPLE",
        default=d.eval_multiples,
        help="evaluated lengths, as multiples of the training length (default 1 2 4 8)",
    )
    p.add_argument(
        "--hidden-size",
        type=int,
        default=d.hidden_size,
        help=f"the reference's width; the others are matched in parameters (default {d.hidden_size})",
    )
    p.add_argument(
        "--layers", type=int, default=d.num_layers, help=f"depth of every model (default {d.num_layers})"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument(
        "--lrs", type=float, nargs="+", default=d.lrs, help=f"learning-rate grid (default {d.lrs})"
    )
    p.add_argument(
        "--mixture",
        type=float,
        nargs=3,
        metavar=("TEXT", "RECALL", "PASSKEY"),
        help="training mixture weights (default 1 2 1)",
    )
    p.add_argument(
        "--max-pairs",
        type=int,
        default=Mixture().max_pairs,
        help="most key-value pairs of a training recall sample (default 4)",
    )
    p.add_argument(
        "--eval-pairs",
        type=int,
        default=d.eval_pairs,
        help=f"pairs of an evaluated recall sample (default {d.eval_pairs})",
    )
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help=f"default {d.eval_samples}")
    p.add_argument("--corpus-max-files", type=int, help="a smaller text corpus (files per source)")
    p.add_argument("--threads", type=int, help="torch threads (default torch's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> LeaderboardConfig:
    weights = dict(zip(("text", "recall", "passkey"), args.mixture)) if args.mixture else {}
    return LeaderboardConfig(
        architectures=args.architectures,
        budget_minutes=args.budget,
        steps=args.steps,
        train_length=args.train_length,
        eval_multiples=args.lengths,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        batch_size=args.batch_size,
        lrs=args.lrs,
        mixture=Mixture(**weights, max_pairs=args.max_pairs),
        eval_pairs=args.eval_pairs,
        eval_samples=args.eval_samples,
        corpus_max_files=args.corpus_max_files,
        threads=args.threads,
        seed=args.seed,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    from eval.leaderboard.report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"python -m eval.leaderboard: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"python -m eval.leaderboard: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        run_leaderboard(cfg, out, argv)
    except ValueError as err:
        print(f"python -m eval.leaderboard: {err}", file=sys.stderr)
        return 2
    report = write_report(out)
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
