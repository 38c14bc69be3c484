"""Train a zoo model from a recipe: ``accelerate launch train.py --config configs/transformer/tiny.yaml``.

The loop lives in ``zoo/training/``; see ``zoo/training/cli.py`` for the options.
"""

import sys

from zoo.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
