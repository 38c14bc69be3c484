"""Baseline Llama-style transformer."""

from zoo.models.registry import register
from zoo.models.transformer.configuration_transformer import TransformerConfig
from zoo.models.transformer.modeling_transformer import (
    TransformerForCausalLM,
    TransformerForSequenceClassification,
    TransformerModel,
    TransformerPreTrainedModel,
)

register(
    TransformerConfig,
    model=TransformerModel,
    causal_lm=TransformerForCausalLM,
    sequence_classification=TransformerForSequenceClassification,
    lora_targets="llama",  # Llama's weight names: peft's defaults for Llama
)

__all__ = [
    "TransformerConfig",
    "TransformerForCausalLM",
    "TransformerForSequenceClassification",
    "TransformerModel",
    "TransformerPreTrainedModel",
]
