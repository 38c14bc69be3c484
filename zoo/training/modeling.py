"""From a recipe's ``model`` and ``tokenizer`` sections to a ready-to-train model and its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from zoo.training.recipe import (
    INIT_FROM_OTHER_ARCHITECTURE,
    Recipe,
    RecipeError,
    check_position_limits,
    is_local_path,
)

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
    For ``training.objective: mlm`` a tokenizer without a mask token gets ``<mask>`` at the next free id.

    A pretrained model's tokenizer that exists but fails to load is an error, never a silent switch to bytes
    (the ids would mean something else); only a local folder with no tokenizer files falls back, with a warning.
    """
    tokenizer = _load_tokenizer(recipe)
    if recipe.training.objective == "mlm":
        from zoo.training.mlm import ensure_mask_token

        ensure_mask_token(tokenizer)
    return tokenizer


def _load_tokenizer(recipe: Recipe):
    from zoo.data.tokenizer import load_tokenizer

    name = recipe.tokenizer.name
    pretrained = recipe.model.get("pretrained")
    if is_cross_architecture(recipe):
        # the source checkpoint is checked first, so a bad path or architecture is named as such
        source_config(recipe)
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


def is_cross_architecture(recipe: Recipe) -> bool:
    """Whether the recipe initialises a ``type`` model from a ``pretrained`` checkpoint of another kind."""
    return "type" in recipe.model and "pretrained" in recipe.model


def source_config(recipe: Recipe):
    """The configuration of ``model.pretrained`` for a cross-architecture recipe, checked to be a source that
    ``model.type``'s initialising classmethod accepts; a :class:`RecipeError` naming the problem otherwise."""
    _register_zoo()
    target, source = recipe.model["type"], recipe.model["pretrained"]
    method, accepted = INIT_FROM_OTHER_ARCHITECTURE[target]
    where = f"model.pretrained: the checkpoint to initialise {target} from, {source!r},"
    advice = "give a folder saved by save_pretrained (a finished run's output_dir) or a Hub id"
    if is_local_path(source, Path(".")) and not Path(source).expanduser().exists():
        raise RecipeError(f"{where} does not exist; {advice}")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as err:
        raise RecipeError(f"{where} could not be loaded ({err}); {advice}") from None
    if config.model_type == target:
        return config
    if accepted is not None and config.model_type not in accepted:
        raise RecipeError(
            f"model.pretrained: {source!r} is a {config.model_type!r} checkpoint, but {target}'s {method}"
            f" initialises from {' or '.join(map(repr, accepted))} only"
        )
    if accepted is None and type(config) not in AutoModelForCausalLM._model_mapping:
        raise RecipeError(
            f"model.pretrained: {source!r} is a {config.model_type!r} checkpoint, which is not a causal LM;"
            f" {target}'s {method} wraps a causal language model"
        )
    return config


def _model_from_other_architecture(recipe: Recipe):
    """``model.type``'s classmethod (``from_baseline``, ``from_backbone``) over the ``model.pretrained`` checkpoint,
    the other ``model`` keys passed to it; None when the checkpoint already is a ``model.type`` model."""
    config = source_config(recipe)
    target, source = recipe.model["type"], recipe.model["pretrained"]
    if config.model_type == target:
        return None
    method = INIT_FROM_OTHER_ARCHITECTURE[target][0]
    target_class = AutoModelForCausalLM._model_mapping[AutoConfig.for_model(target).__class__]
    kwargs = {k: v for k, v in recipe.model.items() if k not in ("type", "pretrained")}
    logger.info(
        "initialising %s from the %s checkpoint %s with %s", target, config.model_type, source, method
    )
    try:
        return getattr(target_class, method)(source, **kwargs)
    except (ValueError, TypeError, OSError) as err:
        raise RecipeError(f"model: {target_class.__name__}.{method}({source!r}, **{kwargs}): {err}") from None


def check_vocab(config, tokenizer, key: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise RecipeError(
            f"{key}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size};"
            f" token ids past {config.vocab_size - 1} would index outside the embedding"
        )


def build_config(recipe: Recipe, tokenizer):
    """The model configuration, with ``vocab_size`` and special token ids taken from the tokenizer when the
    recipe leaves them out; a tokenizer larger than the model's vocabulary is an error."""
    _register_zoo()
    spec = dict(recipe.model)
    if "pretrained" in spec:
        source = spec.pop("pretrained")
        spec.pop("type", None)
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
    check_vocab(
        config, tokenizer, "model.vocab_size" if "pretrained" not in recipe.model else "tokenizer.name"
    )
    check_position_limits(config, recipe.training)
    return config


def build_model(recipe: Recipe, tokenizer):
    model = _model_from_other_architecture(recipe) if is_cross_architecture(recipe) else None
    if model is not None:
        check_vocab(model.config, tokenizer, "tokenizer.name")
        check_position_limits(model.config, recipe.training)
    elif "pretrained" in recipe.model:
        config = build_config(recipe, tokenizer)
        overrides = {k: v for k, v in recipe.model.items() if k not in ("pretrained", "type")}
        auto_class = _auto_class(recipe, config)
        try:
            model = auto_class.from_pretrained(recipe.model["pretrained"], config=config)
        except Exception as err:
            raise RecipeError(
                f"model.pretrained: could not load {recipe.model['pretrained']!r}: {err}"
            ) from None
        if overrides:
            logger.info("config overrides on the pretrained model: %s", overrides)
    else:
        config = build_config(recipe, tokenizer)
        model = _auto_class(recipe, config).from_config(config)
    model = model.to(torch.float32)
    if recipe.training.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise RecipeError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if recipe.finetune.method == "lora":
        from zoo.training.lora import apply_lora

        model = apply_lora(model, recipe.finetune)
    return model


def _auto_class(recipe: Recipe, config):
    """AutoModelForCausalLM, or AutoModelForMaskedLM for ``training.objective: mlm`` (an encoder's head)."""
    if recipe.training.objective != "mlm":
        return AutoModelForCausalLM
    if type(config) not in AutoModelForMaskedLM._model_mapping:
        raise RecipeError(
            f"training.objective: mlm needs a masked-language-model head, and {config.model_type} has none (it is"
            " causal only); use objective: causal, or an encoder such as zoo_longformer or zoo_bigbird"
        )
    return AutoModelForMaskedLM


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
