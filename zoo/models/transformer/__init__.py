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
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

__all__ = [
    "TransformerConfig",
    "TransformerForCausalLM",
    "TransformerForSequenceClassification",
    "TransformerModel",
    "TransformerPreTrainedModel",
]
