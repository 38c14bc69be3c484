"""Command line of ``train.py`` / ``zoo-train``.

    accelerate launch train.py --config configs/transformer/tiny.yaml optim.lr=3e-4 --max_steps 200

Positional ``key=value`` arguments override recipe keys (values read as YAML); ``--output_dir``, ``--max_steps``,
``--seed`` and ``--resume`` (``auto``, ``none`` or a checkpoint folder) are shortcuts for the common ones.
Exit codes: 0 done, 2 bad recipe or input, 3 training diverged, 4 Hub push failed (the model is saved locally).
"""

from __future__ import annotations

import argparse
import logging
import sys

from zoo.training.recipe import RecipeError, load_recipe

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PUSH_FAILED = 2, 3, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="recipe YAML file (configs/<arch>/<size>.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.lr=3e-4"
    )
    parser.add_argument("--output_dir", help="training.output_dir")
    parser.add_argument("--max_steps", type=int, help="training.max_steps")
    parser.add_argument("--seed", type=int, help="training.seed")
    parser.add_argument("--resume", help="checkpointing.resume: auto, none or a checkpoint folder")
    parser.add_argument(
        "--dry_run", action="store_true", help="validate and print the resolved recipe, then exit"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("zoo").setLevel(logging.INFO)
    flags = {
        "output_dir": args.output_dir,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "resume": args.resume,
    }
    try:
        recipe = load_recipe(args.config, args.overrides, flags)
        if args.dry_run:
            print(recipe.to_yaml(), end="")
            return 0
        from zoo.training.loop import TrainingDiverged, train
        from zoo.training.push import HubPushError

        try:
            train(recipe)
        except TrainingDiverged as err:
            print(f"error: training diverged: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        except HubPushError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_PUSH_FAILED
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
