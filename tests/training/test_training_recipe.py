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
        ({"data": {"train": "no/such/file.txt"}}, "data.train: no such file or folder 'no/such/file.txt'"),
        (
            {"data": {"train": "synthetic:cpy"}},
            "data.train: unknown synthetic task 'cpy' (did you mean 'copy'?)",
        ),
        ({"schedule": {"name": "linear"}}, "schedule.name: 'linear' is not one of cosine, wsd, constant"),
        ({"hub": {"push": True}}, "hub.repo_id: required"),
        ({"checkpointing": {"resume": "/no/such/ckpt"}}, "checkpointing.resume:"),
        (
            {"model": {"type": "zoo_transformer", "pretrained": "x"}},
            "model.type: zoo_transformer has no initialisation from another architecture's checkpoint",
        ),
        ({"model": {"num_hidden_layers": 2}}, "model: give `type:` (train from scratch), `pretrained:`"),
        # Values that used to pass validation and failed (or silently misbehaved) later.
        ({"optim": {"lr": float("nan")}}, "optim.lr: expected a finite number, got nan"),
        ({"optim": {"lr": float("inf")}}, "optim.lr: expected a finite number, got inf"),
        ({"optim": {"weight_decay": -0.1}}, "optim.weight_decay: must be >= 0, got -0.1"),
        ({"optim": {"eps": 0.0}}, "optim.eps: must be > 0, got 0.0"),
        (
            {"optim": {"max_grad_norm": 0.0}},
            "optim.max_grad_norm: must be > 0 (or null for no clipping), got 0.0",
        ),
        ({"schedule": {"warmup_steps": -5}}, "schedule.warmup_steps: must be >= 0, got -5"),
        (
            {"eval": {"batch_size": 0}},
            "eval.batch_size: must be >= 1 (or null for training.batch_size), got 0",
        ),
        ({"logging": {"sample_tokens": 0}}, "logging.sample_tokens: must be >= 1, got 0"),
        ({"logging": {"sample_prompt": ""}}, "logging.sample_prompt: must not be empty"),
        ({"training": {"seed": -1}}, "training.seed: must be >= 0, got -1"),
        ({"finetune": {"method": "lora", "dropout": 1.5}}, "finetune.dropout: must be in [0, 1), got 1.5"),
        (
            {"model": {**TINY_MODEL, "position_embedding_type": "learned"}, "training": {"block_size": 128}},
            "training.block_size: 128 is past model.max_position_embeddings = 64",
        ),
        (
            {
                "model": {**TINY_MODEL, "position_embedding_type": "learned"},
                "training": {"block_size": 64, "randomized_positions": 256},
            },
            "training.randomized_positions: 256 is past model.max_position_embeddings = 64",
        ),
        (
            {"data": {"train": "synthetic:copy", "synthetic": {"n": 10, "min_lenn": 3}}},
            "data.synthetic.min_lenn: not an option of synthetic:copy (did you mean 'min_len'?);"
            " valid: alphabet, max_len, min_len, n, n_validation",
        ),
        (
            {"data": {"train": "synthetic:copy", "synthetic": {"min_len": 9, "max_len": 3}}},
            "data.synthetic: synthetic:copy rejects these options",
        ),
        (
            {"data": {"train": "synthetic:copy", "synthetic": {"n": 0}}},
            "data.synthetic.n: must be >= 1, got 0",
        ),
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


def _pretrained(tmp_path: Path, **config) -> Path:
    """A tiny saved zoo_transformer with zoo's byte tokenizer beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import zoo  # noqa: F401
    from zoo.data.tokenizer import default_tokenizer

    folder = tmp_path / "pretrained"
    kwargs = {**{k: v for k, v in TINY_MODEL.items() if k != "type"}, "vocab_size": 259, **config}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("zoo_transformer", **kwargs)).save_pretrained(
        folder
    )
    default_tokenizer().save_pretrained(folder)
    return folder


BAD_INPUTS = {
    "malformed_yaml": "malformed YAML",
    "unknown_key": "training.max_step: unknown key (did you mean 'max_steps'?)",
    "missing_data": "data.train: no such file or folder",
    "missing_relative_folder": "data.train: no such file or folder 'no/such/folder'",
    "partly_existing_path": "data.train: no such file or folder 'data/missing'",
    "dot_path": "data.train: no such file or folder '.data'",
    "hub_offline": "data.train: could not load Hub dataset 'someone/nothing-here'",
    "vocab_mismatch": "model.vocab_size: the tokenizer has 259 tokens but the model's vocab_size is 100",
    "text_column": "data.text_column: 'body' is not a column of data.train",
    "one_document": "has 1 document(s); need 2+ to hold one out",
    "tokenizer_missing": "tokenizer.name: could not load tokenizer",
    "broken_pretrained_tokenizer": "tokenizer.name: null, so model.pretrained's tokenizer is used",
    "pretrained_learned_overflow": "training.block_size: 128 is past model.max_position_embeddings = 64",
    "learned_sample_overflow": "logging.sample_tokens: the prompt 'The ' (4 tokens) plus 80 new tokens",
    "synthetic_typo": "data.synthetic.min_lenn: not an option of synthetic:copy",
    "lora_dropout": "finetune.dropout: must be in [0, 1), got 1.5",
    "sample_tokens": "logging.sample_tokens: must be >= 1, got -1",
    "unwritable_output": "training.output_dir: cannot write to",
    "missing_config": "--config: recipe file",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_exits_nonzero_before_writing_anything(tmp_path, capsys, monkeypatch, case):
    # Relative data paths resolve against the working directory.
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path)
    args = ["--config", str(path)]
    if case == "malformed_yaml":
        path.write_text("model: {type: zoo_transformer\n  hidden: [1, 2\n")
    elif case == "unknown_key":
        args.append("training.max_step=3")
    elif case == "missing_data":
        args.append(f"data.train={tmp_path / 'missing.jsonl'}")
    elif case == "missing_relative_folder":
        args.append("data.train=no/such/folder")
    elif case == "partly_existing_path":
        (tmp_path / "data").mkdir()
        args.append("data.train=data/missing")
    elif case == "dot_path":
        args.append("data.train=.data")
    elif case == "hub_offline":
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        args.append("data.train=someone/nothing-here")
    elif case == "vocab_mismatch":
        args.append("model.vocab_size=100")
    elif case == "text_column":
        args.append("data.text_column=body")
    elif case == "one_document":
        (tmp_path / "tiny.txt").write_text("a single paragraph\n")
        args.append(f"data.train={tmp_path / 'tiny.txt'}")
    elif case == "tokenizer_missing":
        args.append(f"tokenizer.name={tmp_path / 'no-tokenizer'}")
    elif case == "broken_pretrained_tokenizer":
        folder = _pretrained(tmp_path)
        (folder / "tokenizer_config.json").write_text("{not json")
        args.append(f"model={{pretrained: {folder}}}")
    elif case == "pretrained_learned_overflow":
        folder = _pretrained(tmp_path, position_embedding_type="learned")
        args += [f"model={{pretrained: {folder}}}", "training.block_size=128"]
    elif case == "learned_sample_overflow":
        args += ["model.position_embedding_type=learned", "logging.sample_tokens=80"]
    elif case == "synthetic_typo":
        args.append("data.synthetic.min_lenn=3")
    elif case == "lora_dropout":
        args += ["finetune.method=lora", "finetune.dropout=1.5"]
    elif case == "sample_tokens":
        args.append("logging.sample_tokens=-1")
    elif case == "unwritable_output":
        (tmp_path / "a_file").write_text("not a folder")
        args += ["--output_dir", str(tmp_path / "a_file" / "out")]
    elif case == "missing_config":
        args = ["--config", str(tmp_path / "nope.yaml")]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert BAD_INPUTS[case] in err, err
    # Validated before any work: no output folder, so no recipe.yaml, logs or checkpoints either.
    assert not (tmp_path / "out").exists(), sorted(p.name for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cpu", "MULTI_GPU"),
        ("ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("fsdp_cpu", "FSDP"),
        ("deepspeed", "DEEPSPEED"),
    ],
)
def test_accelerate_launch_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    # The CPU configs start torchrun workers that the loop turns into a gloo group (see their comments).
    assert config.use_cpu == (name in ("cpu", "fsdp_cpu"))


def test_pretrained_tokenizer_choice(tmp_path, caplog):
    from zoo.training.modeling import build_tokenizer

    folder = _pretrained(tmp_path)
    recipe = recipe_from_dict({"model": {"pretrained": str(folder)}})
    assert len(build_tokenizer(recipe)) == 259
    # A folder with no tokenizer files at all: zoo's byte tokenizer, said out loud.
    for item in folder.iterdir():
        if item.name not in ("config.json", "model.safetensors", "generation_config.json"):
            item.unlink()
    with caplog.at_level("WARNING", logger="zoo.training.modeling"):
        assert len(build_tokenizer(recipe)) == 259
    assert "holds no tokenizer files; using zoo's byte-level tokenizer" in caplog.text
