"""Registration of zoo architectures with transformers' Auto classes.

Each model package calls :func:`register` on import. ``REGISTRY`` lists what is registered, which the shared model
test suite iterates over. A ``model_type`` that transformers already owns is refused, so that registering never
replaces transformers' own classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES


@dataclass(frozen=True)
class Registered:
    config: type
    model: type
    causal_lm: type | None = None
    sequence_classification: type | None = None
    masked_lm: type | None = None
    lora_targets: tuple[str, ...] = ()


REGISTRY: dict[str, Registered] = {}


def register(
    config, *, model, causal_lm=None, sequence_classification=None, masked_lm=None, lora_targets=()
) -> None:
    """Register ``config`` and its model classes; ``lora_targets`` are the default peft LoRA module names."""
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
    if masked_lm is not None:
        AutoModelForMaskedLM.register(config, masked_lm)
    REGISTRY[model_type] = Registered(
        config, model, causal_lm, sequence_classification, masked_lm, tuple(lora_targets)
    )


def default_lora_targets(model_or_type) -> list[str]:
    """The module names a LoRA adapter should wrap by default for a zoo model (or its ``model_type``)."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in REGISTRY or not REGISTRY[model_type].lora_targets:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r}; pass target_modules explicitly"
        )
    return list(REGISTRY[model_type].lora_targets)
