"""Mamba-2 (state-space duality)."""

from zoo.models.mamba2.configuration_mamba2 import ZooMamba2Config
from zoo.models.mamba2.modeling_mamba2 import (
    Mamba2ForCausalLM,
    Mamba2ForSequenceClassification,
    Mamba2Model,
    Mamba2PreTrainedModel,
)
from zoo.models.registry import register

register(
    ZooMamba2Config,
    model=Mamba2Model,
    causal_lm=Mamba2ForCausalLM,
    sequence_classification=Mamba2ForSequenceClassification,
    lora_targets=("in_proj", "out_proj"),
)

__all__ = [
    "Mamba2ForCausalLM",
    "Mamba2ForSequenceClassification",
    "Mamba2Model",
    "Mamba2PreTrainedModel",
    "ZooMamba2Config",
]
