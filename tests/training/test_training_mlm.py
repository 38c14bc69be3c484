"""The masked-language-modelling objective (``training.objective: mlm``) and the length curriculum."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

import zoo  # noqa: F401
from zoo.data.tokenizer import default_tokenizer
from zoo.training import RecipeError, load_recipe, recipe_from_dict, train
from zoo.training.cli import EXIT_BAD_INPUT, main
from zoo.training.mlm import Masker, ensure_mask_token
from zoo.training.recipe import curriculum_length

ENCODER = {
    "type": "zoo_longformer",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "attention_window": 16,
    "max_position_embeddings": 80,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
DECODER = {
    "type": "zoo_transformer",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


def _recipe_file(tmp_path: Path, model: dict, **training) -> Path:
    raw = {
        "model": model,
        "data": {"train": "synthetic:markov", "synthetic": {"n": 60}, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "training": {
            "max_steps": 16,
            "batch_size": 4,
            "block_size": 64,
            "output_dir": str(tmp_path / "out"),
            **training,
        },
        "logging": {"every": 4, "progress_bar": False, "sample_tokens": 4, "tensorboard": False},
        "checkpointing": {"every": 0},
        "eval": {"every": 0, "max_batches": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_mask_token_is_added_after_the_existing_ids():
    tokenizer = default_tokenizer()
    before = tokenizer("Where is Mary? <mask>")["input_ids"]
    assert ensure_mask_token(tokenizer) == 259 and len(tokenizer) == 260
    # Every existing id keeps its meaning; the text "<mask>" still encodes as its bytes.
    assert tokenizer("Where is Mary? <mask>")["input_ids"] == before
    assert tokenizer.decode([259]) == "<mask>" and ensure_mask_token(tokenizer) == 259


def test_masking_statistics_and_determinism():
    tokenizer = default_tokenizer()
    mask_id = ensure_mask_token(tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (64, 256), generator=g)
    ids[:, ::50] = tokenizer.eos_token_id  # document ends inside the blocks
    attention_mask = torch.ones_like(ids)
    attention_mask[:8, 200:] = 0  # padding at the end of some blocks
    ids[:8, 200:] = tokenizer.pad_token_id
    batch = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": torch.zeros_like(ids)}
    masker = Masker(tokenizer, 0.15)
    out = masker(batch, seed=1)
    assert set(out) == {"input_ids", "attention_mask", "labels"}  # no restarting position ids for an encoder
    chosen = out["labels"] != -100
    candidates = (attention_mask == 1) & (ids != tokenizer.eos_token_id)
    # Only ordinary tokens are chosen, labelled with their original ids; the rest is untouched.
    assert not chosen[~candidates].any()
    assert torch.equal(out["labels"][chosen], ids[chosen])
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])
    fraction = chosen.sum().item() / candidates.sum().item()
    assert abs(fraction - 0.15) < 0.01, fraction
    n = chosen.sum().item()
    masked = (out["input_ids"][chosen] == mask_id).sum().item() / n
    kept = (out["input_ids"][chosen] == ids[chosen]).sum().item() / n
    random = 1 - masked - kept
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(random - 0.1) < 0.03
    # A pure function of the seed: a resumed run masks the same tokens.
    assert torch.equal(masker(batch, seed=1)["input_ids"], out["input_ids"])
    assert not torch.equal(masker(batch, seed=2)["labels"], out["labels"])


def test_a_few_mlm_steps_reduce_the_loss(tmp_path):
    metrics = train(load_recipe(_recipe_file(tmp_path, ENCODER, objective="mlm")))
    out = tmp_path / "out"
    logged = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] < logged[0] - 0.5, logged
    # Below a uniform guess over the 260 ids, measured on masked validation tokens.
    assert metrics["val_loss"] < math.log(260) - 1.0, metrics
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert type(model).__name__ == "ZooLongformerForMaskedLM" and model.config.vocab_size == 260
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 260 and tokenizer.mask_token_id == 259


def test_causal_only_architecture_with_mlm_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(
        ValueError, match="training.objective: mlm needs a masked-language-model head, and zoo_transformer"
    ):
        recipe_from_dict({"model": DECODER, "training": {"objective": "mlm"}})
    # A pretrained causal checkpoint: refused when its configuration is read, before anything is written.
    folder = tmp_path / "decoder"
    spec = {k: v for k, v in DECODER.items() if k != "type"}
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("zoo_transformer", vocab_size=260, **spec)
    ).save_pretrained(folder)
    path = _recipe_file(tmp_path, {"pretrained": str(folder)}, objective="mlm")
    assert main(["--config", str(path), "training.objective=mlm", "tokenizer.name=byte"]) == EXIT_BAD_INPUT
    assert "training.objective: mlm needs a masked-language-model head" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "curriculum, message",
    [
        ([[5, 32]], "training.curriculum[0]: the first stage must start at step 0"),
        ([[0, 32], [0, 64]], "training.curriculum[1]: steps must increase"),
        ([[0, 128]], "training.curriculum[0]: length 128 must be in 1..training.block_size (64)"),
        ([[0]], "training.curriculum[0]: expected [step, length]"),
    ],
)
def test_curriculum_is_checked(curriculum, message):
    with pytest.raises(
        RecipeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        recipe_from_dict({"model": DECODER, "training": {"block_size": 64, "curriculum": curriculum}})


def test_curriculum_trains_on_growing_prefixes(tmp_path):
    recipe = load_recipe(
        _recipe_file(tmp_path, DECODER, max_steps=3, curriculum=[[0, 16], [2, 64]], batch_size=2)
    )
    assert [curriculum_length(recipe.training, s) for s in range(4)] == [16, 16, 64, 64]
    metrics = train(recipe)
    assert metrics["tokens"] == 2 * 16 + 2 * 16 + 2 * 64
