"""From a recipe's ``model`` and ``tokenizer`` sections to a ready-to-train model and its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from zoo.training.recipe import Recipe, RecipeError, check_position_limits

logger = logging.getLogger(__name__)


def _register_zoo() -> None:
    try:
        import zoo  # noqa: F401  registers the zoo architectures with the Auto classes
    except ImportError as err:
        logger.warning("could not import zoo model packages: %s", err)


# Files that hold a tokenizer in a saved folder; a folder with none of them has no tokenizer to load.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def build_tokenizer(recipe: Recipe):
    """``tokenizer.name`` if given; else the tokenizer saved with ``model.pretrained``; else zoo's byte tokenizer.

    A pretrained model's tokenizer that exists but fails to load is an error, never a silent switch to bytes
    (the ids would mean something else); only a local folder with no tokenizer files falls back, with a warning.
    """
    from zoo.data.tokenizer import load_tokenizer

    name = recipe.tokenizer.name
    pretrained = recipe.model.get("pretrained")
    if name is None and pretrained is not None:
        folder = Path(pretrained).expanduser()
        if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            logger.warning(
                "%s holds no tokenizer files; using zoo's byte-level tokenizer (set tokenizer.name to choose)",
                pretrained,
            )
            return load_tokenizer(None)
        try:
            return load_tokenizer(pretrained)
        except Exception as err:
            raise RecipeError(
                f"tokenizer.name: null, so model.pretrained's tokenizer is used, and it could not be loaded from"
                f" {pretrained!r}: {err}; repair it, or set tokenizer.name (a tokenizer folder or Hub id, or"
                " 'byte' for zoo's byte-level tokenizer)"
            ) from None
    try:
        return load_tokenizer(name)
    except Exception as err:
        raise RecipeError(f"tokenizer.name: could not load tokenizer {name!r}: {err}") from None


def build_config(recipe: Recipe, tokenizer):
    """The model configuration, with ``vocab_size`` and special token ids taken from the tokenizer when the
    recipe leaves them out; a tokenizer larger than the model's vocabulary is an error."""
    _register_zoo()
    spec = dict(recipe.model)
    if "pretrained" in spec:
        source = spec.pop("pretrained")
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as err:
            raise RecipeError(f"model.pretrained: could not load a config from {source!r}: {err}") from None
        for key, value in spec.items():
            if not hasattr(config, key):
                raise RecipeError(f"model.{key}: {type(config).__name__} has no such field")
            setattr(config, key, value)
    else:
        model_type = spec.pop("type")
        spec.setdefault("vocab_size", len(tokenizer))
        for token in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(tokenizer, token, None) is not None:
                spec.setdefault(token, getattr(tokenizer, token))
        try:
            config = AutoConfig.for_model(model_type, **spec)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"model: {err}") from None
    if len(tokenizer) > config.vocab_size:
        key = "model.vocab_size" if "pretrained" not in recipe.model else "tokenizer.name"
        raise RecipeError(
            f"{key}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size};"
            f" token ids past {config.vocab_size - 1} would index outside the embedding"
        )
    check_position_limits(config, recipe.training)
    return config


def build_model(recipe: Recipe, tokenizer):
    config = build_config(recipe, tokenizer)
    if "pretrained" in recipe.model:
        overrides = {k: v for k, v in recipe.model.items() if k != "pretrained"}
        try:
            model = AutoModelForCausalLM.from_pretrained(recipe.model["pretrained"], config=config)
        except Exception as err:
            raise RecipeError(
                f"model.pretrained: could not load {recipe.model['pretrained']!r}: {err}"
            ) from None
        if overrides:
            logger.info("config overrides on the pretrained model: %s", overrides)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32)
    if recipe.training.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise RecipeError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if recipe.finetune.method == "lora":
        from zoo.training.lora import apply_lora

        model = apply_lora(model, recipe.finetune)
    return model


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
