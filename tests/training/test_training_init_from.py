"""Continued pre-training from another architecture's checkpoint: ``model.type`` + ``model.pretrained``.

The trainer builds the ``type`` model through its classmethod (Infini-attention's ``from_baseline``) from a
baseline transformer checkpoint; bad sources stop the run before anything is written.
"""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

import zoo  # noqa: F401
from zoo.data.tokenizer import default_tokenizer
from zoo.training import RecipeError, load_recipe, recipe_from_dict, train
from zoo.training.cli import EXIT_BAD_INPUT, main
from zoo.training.modeling import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
BASELINE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "vocab_size": 259,
}


def _save(folder: Path, model_type: str, **kwargs) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("baseline"), "zoo_transformer", **BASELINE)


def _recipe_file(tmp_path: Path, model: dict) -> Path:
    raw = {
        "model": model,
        "data": {"train": "synthetic:copy", "synthetic": {"n": 100}, "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 2, "batch_size": 2, "block_size": 64, "output_dir": str(tmp_path / "out")},
        "logging": {"every": 1, "progress_bar": False, "sample_tokens": 4, "tensorboard": False},
        "checkpointing": {"every": 0},
        "eval": {"every": 0, "max_batches": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_trainer_builds_infini_from_baseline_checkpoint(baseline):
    recipe = recipe_from_dict(
        {
            "model": {
                "type": "zoo_infini",
                "pretrained": str(baseline),
                "segment_length": 16,
                "gate_init": -10.0,
            },
            "training": {"block_size": 64},
        }
    )
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer).eval()
    base = AutoModelForCausalLM.from_pretrained(baseline).eval()
    assert model.config.model_type == "zoo_infini" and model.config.segment_length == 16
    assert model.config.hidden_size == BASELINE["hidden_size"] and len(tokenizer) == 259
    # Inside one segment the memory is empty and the gate closed: the baseline's logits (sigmoid(-10) = 4.5e-5).
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-3, atol=1e-3)
        # Past one segment the memory takes part: not the baseline's attention any more.
        long = torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(model(long).logits[:, 16:], base(long).logits[:, 16:], atol=1e-3)


def test_continued_recipe_trains_and_saves_the_target_architecture(baseline, tmp_path):
    """The shipped recipe, pointed at a baseline checkpoint and shortened to two steps."""
    recipe = load_recipe(
        REPO / "configs" / "infini" / "continued-tiny.yaml",
        [
            f"model.pretrained={baseline}",
            "training.block_size=64",
            "training.batch_size=2",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "logging.sample_tokens=4",
            "eval.every=0",
            "eval.max_batches=1",
            "checkpointing.every=0",
            "data.train=synthetic:copy",
            "data.synthetic={n: 100}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        {"max_steps": 2, "output_dir": str(tmp_path / "out")},
    )
    metrics = train(recipe)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert saved.config.model_type == "zoo_infini" and saved.config.segment_length == 32
    assert saved.config.gate_init == -3.0 and metrics["steps"] == 2


@pytest.mark.parametrize("case", ["missing", "wrong_architecture", "bad_option"])
def test_bad_source_stops_before_writing(baseline, tmp_path, capsys, case):
    model = {"type": "zoo_infini", "pretrained": str(baseline), "segment_length": 16}
    if case == "missing":
        model["pretrained"] = str(tmp_path / "no-such-run")
        expected = f"model.pretrained: the checkpoint to initialise zoo_infini from, '{tmp_path / 'no-such-run'}', does not exist"
    elif case == "wrong_architecture":
        model["pretrained"] = str(
            _save(tmp_path / "mamba", "zoo_mamba", hidden_size=32, num_hidden_layers=1, vocab_size=259)
        )
        expected = "is a 'zoo_mamba' checkpoint, but zoo_infini's from_baseline initialises from 'zoo_transformer' only"
    else:
        model["memory_update"] = "quadratic"
        expected = "model: InfiniForCausalLM.from_baseline("
    assert main(["--config", str(_recipe_file(tmp_path, model))]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_recipe_checks_the_target_keys_and_that_a_method_exists(baseline):
    with pytest.raises(RecipeError, match="model.segment_lenght: unknown key for zoo_infini"):
        recipe_from_dict({"model": {"type": "zoo_infini", "pretrained": str(baseline), "segment_lenght": 8}})
    with pytest.raises(RecipeError, match="model.type: zoo_mamba has no initialisation from another"):
        recipe_from_dict({"model": {"type": "zoo_mamba", "pretrained": str(baseline)}})


def test_trainer_wraps_a_checkpoint_with_rmt(baseline):
    recipe = recipe_from_dict(
        {"model": {"type": "zoo_rmt", "pretrained": str(baseline), "num_mem_tokens": 2, "segment_length": 16}}
    )
    model = build_model(recipe, build_tokenizer(recipe))
    base = AutoModelForCausalLM.from_pretrained(baseline)
    assert model.config.model_type == "zoo_rmt" and model.config.num_mem_tokens == 2
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
