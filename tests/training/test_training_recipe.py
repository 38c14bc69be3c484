"""Recipe schema: validation before any work, overrides and flags, and the CLI's answer to bad input."""

from pathlib import Path

import pytest
import yaml

from zoo.training.cli import EXIT_BAD_INPUT, main
from zoo.training.recipe import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "type": "zoo_transformer",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def write_recipe(tmp_path: Path, **sections) -> Path:
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"train": "synthetic:copy", "synthetic": {"n": 64}, "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 2, "batch_size": 2, "block_size": 64, "output_dir": str(tmp_path / "out")},
        "logging": {"progress_bar": False, "tensorboard": False},
        "eval": {"max_batches": 1},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"optim": {"lrr": 1e-3}}, "optim.lrr: unknown key (did you mean 'lr'?)"),
        ({"optimm": {}}, "optimm: unknown section (did you mean 'optim'?)"),
        (
            {"model": {**TINY_MODEL, "hiden_size": 8}},
            "model.hiden_size: unknown key for zoo_transformer (did you mean",
        ),
        (
            {"model": {"type": "zoo_transfomer"}},
            "model.type: unknown model_type 'zoo_transfomer' (did you mean",
        ),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
        ({"training": {"max_steps": 2.5}}, "training.max_steps: expected an integer"),
        ({"training": {"compile": "yes"}}, "training.compile: expected true or false"),
        ({"model": {**TINY_MODEL, "hidden_size": "big"}}, "model.hidden_size: expected a number"),
        ({"data": {"train": "no/such/file.txt"}}, "data.train: data path 'no/such/file.txt' does not exist"),
        (
            {"data": {"train": "synthetic:cpy"}},
            "data.train: unknown synthetic task 'cpy' (did you mean 'copy'?)",
        ),
        ({"schedule": {"name": "linear"}}, "schedule.name: 'linear' is not one of cosine, wsd, constant"),
        ({"hub": {"push": True}}, "hub.repo_id: required"),
        ({"checkpointing": {"resume": "/no/such/ckpt"}}, "checkpointing.resume:"),
        ({"model": {"type": "zoo_transformer", "pretrained": "x"}}, "model: give exactly one of"),
    ],
)
def test_bad_recipes_name_the_dotted_key(raw, message):
    raw = {"model": dict(TINY_MODEL), **raw}
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert message in str(err.value)


def test_defaults_overrides_and_flags(tmp_path):
    path = write_recipe(tmp_path)
    recipe = load_recipe(
        path,
        ["optim.lr=3e-4", "optim.betas=[0.9, 0.99]", "schedule.name=wsd", "model.hidden_size=64"],
        {"output_dir": str(tmp_path / "elsewhere"), "max_steps": 7, "seed": 3, "resume": "none"},
    )
    assert recipe.optim.lr == pytest.approx(3e-4) and isinstance(recipe.optim.lr, float)
    assert recipe.optim.betas == [0.9, 0.99]
    assert recipe.schedule.name == "wsd" and recipe.model["hidden_size"] == 64
    assert recipe.training.output_dir == str(tmp_path / "elsewhere")
    assert (recipe.training.max_steps, recipe.training.seed, recipe.checkpointing.resume) == (7, 3, "none")
    # Unset sections get their defaults; the resolved recipe round-trips through YAML.
    assert recipe.checkpointing.keep_last == 2 and recipe.finetune.method is None
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_yaml_exponent_floats_are_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {type: zoo_transformer}\noptim: {lr: 3e-4, eps: 1e-8}\n")
    recipe = load_recipe(path)
    assert recipe.optim.lr == pytest.approx(3e-4) and recipe.optim.eps == pytest.approx(1e-8)


def test_override_syntax_errors():
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(None, ["optim.lr"])
    with pytest.raises(RecipeError, match="optim.lr: expected a number"):
        load_recipe(None, ["model.type=zoo_transformer", "optim.lr=fast"])


def test_shipped_recipes_validate(capsys):
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        if path.parent.name == "accelerate":
            continue
        assert main(["--config", str(path), "--dry_run"]) == 0, path
        assert "model:" in capsys.readouterr().out


def _no_latest_checkpoint(out: Path) -> bool:
    ckpts = out / "checkpoints"
    return not ckpts.exists() or not any(p.name.startswith("checkpoint-") for p in ckpts.iterdir())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("malformed_yaml", "malformed YAML"),
        ("unknown_key", "training.max_step: unknown key (did you mean 'max_steps'?)"),
        ("missing_data", "data.train: data path"),
        (
            "vocab_mismatch",
            "model.vocab_size: the tokenizer has 259 tokens but the model's vocab_size is 100",
        ),
        ("unwritable_output", "training.output_dir: cannot write to"),
        ("missing_config", "--config: recipe file"),
    ],
)
def test_cli_bad_input_exits_nonzero_naming_the_problem(tmp_path, capsys, case, expected):
    path = write_recipe(tmp_path)
    args = ["--config", str(path)]
    if case == "malformed_yaml":
        path.write_text("model: {type: zoo_transformer\n  hidden: [1, 2\n")
    elif case == "unknown_key":
        args.append("training.max_step=3")
    elif case == "missing_data":
        args.append(f"data.train={tmp_path / 'missing.jsonl'}")
    elif case == "vocab_mismatch":
        args.append("model.vocab_size=100")
    elif case == "unwritable_output":
        (tmp_path / "a_file").write_text("not a folder")
        args += ["--output_dir", str(tmp_path / "a_file" / "out")]
    elif case == "missing_config":
        args = ["--config", str(tmp_path / "nope.yaml")]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert expected in err, err
    assert _no_latest_checkpoint(tmp_path / "out")


@pytest.mark.parametrize(
    "name, kind", [("cpu", "MULTI_GPU"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed", "DEEPSPEED")]
)
def test_accelerate_launch_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    # The CPU config starts torchrun workers that the loop turns into a gloo group (see its comment).
    assert config.use_cpu == (name == "cpu")
