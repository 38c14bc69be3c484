"""Every shipped recipe validates, and every architecture's tiny recipe learns in a short run."""

from pathlib import Path

import pytest

import zoo
from zoo.training import load_recipe, train
from zoo.training.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "accelerate")
# configs/<arch>/tiny.yaml, and the tiny variants beside it (configs/mamba/samba-tiny.yaml, ...)
TINY = sorted([*CONFIGS.glob("*/tiny.yaml"), *CONFIGS.glob("*/*-tiny.yaml")])


def _one_per_architecture(paths):
    """Each model type's tiny recipe (``tiny.yaml`` where its folder has one, else its first variant): the
    variants (masked LM, continued pre-training, DNA, Samba) share the architecture's code and are validated by
    the dry run; their own mechanisms are trained in tests/training/test_training_mlm.py and
    test_training_init_from.py."""
    chosen = {}
    for path in sorted(paths, key=lambda p: (p.stem != "tiny", str(p))):
        chosen.setdefault(load_recipe(path).model["type"], path)
    return sorted(chosen.values())


LEARNS = _one_per_architecture(TINY)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates(path, capsys):
    """The whole pre-flight of ``train.py --dry_run`` (recipe, model config, tokenizer, data) passes."""
    assert load_recipe(path).model["type"] in zoo.REGISTRY
    assert main(["--config", str(path), "--dry_run"]) == 0, path
    assert "model:" in capsys.readouterr().out


def test_every_architecture_has_a_tiny_recipe():
    have = {load_recipe(p).model["type"] for p in TINY}
    assert set(zoo.REGISTRY) <= have, f"no configs/<arch>/tiny.yaml for {set(zoo.REGISTRY) - have}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", LEARNS, ids=lambda p: p.parent.name if p.stem == "tiny" else f"{p.parent.name}/{p.stem}"
)
def test_tiny_recipe_learns(path, tmp_path):
    # The shipped recipe, shortened: 40 steps must already take the loss far below its start.
    overrides = [
        "logging.progress_bar=false",
        "eval.every=0",
        "checkpointing.every=0",
        "logging.every=10",
        "logging.tensorboard=false",
    ]
    recipe = load_recipe(path, overrides, {"max_steps": 40, "output_dir": str(tmp_path / "out")})
    metrics = train(recipe)
    # From ~5.6 nats at initialisation (uniform over 259 ids) to below the unigram entropy of the bytes.
    assert metrics["val_loss"] < metrics["unigram_entropy"] - 0.05, metrics
