"""Infini-attention (Munkhdalai et al., 2024, arXiv:2404.07143): segment attention with a compressive memory."""

from zoo.models.infini.configuration_infini import InfiniConfig
from zoo.models.infini.modeling_infini import (
    InfiniForCausalLM,
    InfiniForSequenceClassification,
    InfiniModel,
    InfiniPreTrainedModel,
)
from zoo.models.registry import register, standard_sized


def sized(hidden_size: int, num_layers: int) -> dict:
    """A small Infini-attention model of this width and depth: the baseline's sizes (heads of 32 channels, SwiGLU
    8/3 wide), segments of 64 tokens, the delta rule."""
    return {**standard_sized(hidden_size, num_layers), "segment_length": 64, "memory_update": "delta"}


register(
    InfiniConfig,
    model=InfiniModel,
    causal_lm=InfiniForCausalLM,
    sequence_classification=InfiniForSequenceClassification,
    lora_targets="llama",  # Llama's weight names, as the baseline's
    sized=sized,
)

__all__ = [
    "InfiniConfig",
    "InfiniForCausalLM",
    "InfiniForSequenceClassification",
    "InfiniModel",
    "InfiniPreTrainedModel",
]
