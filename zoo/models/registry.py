"""Registration of zoo architectures with transformers' Auto classes.

Each model package calls :func:`register` on import. ``REGISTRY`` lists what is registered, which the shared model
test suite iterates over. A ``model_type`` that transformers already owns is refused, so that registering never
replaces transformers' own classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES


@dataclass(frozen=True)
class Registered:
    config: type
    model: type
    causal_lm: type | None = None
    sequence_classification: type | None = None
    lora_targets: tuple[str, ...] | str = ()
    # config keywords of a small model of this architecture at a given width and depth (see ``sized_config``)
    sized: Callable[[int, int], dict] | None = None


def standard_sized(hidden_size: int, num_layers: int) -> dict:
    """Width and depth in transformers' standard names: heads of 32 channels, a feed-forward 8/3 as wide (SwiGLU's
    usual ratio, rounded to a multiple of 8)."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": max(1, hidden_size // 32),
        "intermediate_size": 8 * max(1, round(hidden_size * 8 / 3 / 8)),
    }


REGISTRY: dict[str, Registered] = {}


def register(
    config, *, model, causal_lm=None, sequence_classification=None, lora_targets=(), sized=None
) -> None:
    """Register ``config`` and its model classes.

    ``lora_targets``: the default peft LoRA module names, or the name of a transformers model type whose entry
    in peft's own table applies (a zoo model with that model's weight names), so that zoo's defaults are peft's.
    ``sized``: ``(hidden_size, num_layers) -> config keywords`` of a small model of this architecture (what the
    leaderboard trains); None uses :func:`standard_sized`.
    """
    model_type = config.model_type
    if model_type in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"model_type {model_type!r} belongs to transformers; zoo model types start with 'zoo_'"
        )
    if model_type in REGISTRY:
        return
    AutoConfig.register(model_type, config)
    AutoModel.register(config, model)
    if causal_lm is not None:
        AutoModelForCausalLM.register(config, causal_lm)
    if sequence_classification is not None:
        AutoModelForSequenceClassification.register(config, sequence_classification)
    targets = lora_targets if isinstance(lora_targets, str) else tuple(lora_targets)
    REGISTRY[model_type] = Registered(config, model, causal_lm, sequence_classification, targets, sized)


def sized_config(model_type: str, hidden_size: int, num_layers: int, **overrides):
    """A config of ``model_type`` at width ``hidden_size`` and depth ``num_layers`` (its registered ``sized``
    keywords, then ``overrides``)."""
    if model_type not in REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not registered; registered: {sorted(REGISTRY)}")
    entry = REGISTRY[model_type]
    if entry.sized is not None:
        kwargs = entry.sized(hidden_size, num_layers)
    else:  # the standard names this config takes
        accepted = inspect.signature(entry.config.__init__).parameters
        kwargs = {k: v for k, v in standard_sized(hidden_size, num_layers).items() if k in accepted}
    return entry.config(**{**kwargs, **overrides})


def default_lora_targets(model_or_type) -> list[str]:
    """The module names a LoRA adapter should wrap by default for a zoo model (or its ``model_type``)."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    targets = REGISTRY[model_type].lora_targets if model_type in REGISTRY else ()
    if isinstance(targets, str):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

        targets = PEFT_TARGETS.get(targets, ())
    if not targets:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r}; pass target_modules explicitly"
        )
    return list(targets)
