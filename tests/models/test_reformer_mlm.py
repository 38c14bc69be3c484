"""The masked-LM recipe of Reformer (configs/reformer/mlm-tiny.yaml) learns: shortened to 40 steps of 8 blocks, the loss on
masked tokens falls from a uniform guess over the 260 ids to near the unigram entropy of the bytes (the first thing
a masked LM learns; using the context comes after about 100 steps, as for Longformer's recipe)."""

import json
import math
from pathlib import Path

import pytest

from zoo.training import load_recipe, train

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "reformer" / "mlm-tiny.yaml"


@pytest.mark.slow
def test_mlm_recipe_learns(tmp_path):
    overrides = [
        "logging.progress_bar=false",
        "eval.every=0",
        "checkpointing.every=0",
        "logging.every=10",
        "logging.tensorboard=false",
        "training.batch_size=8",
    ]
    out = tmp_path / "out"
    metrics = train(load_recipe(RECIPE, overrides, {"max_steps": 40, "output_dir": str(out)}))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in logged if "train/loss" in row]
    assert losses[-1] < losses[0] - 1.5, losses
    # uniform over 260 ids is 5.56 nats; the bytes' unigram entropy about 3.2
    assert metrics["val_loss"] < math.log(260) - 2.0, metrics
    assert metrics["val_loss"] < metrics["unigram_entropy"] + 0.15, metrics
