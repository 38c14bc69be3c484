"""Recurrent Memory Transformer: memory tokens and segment recurrence over any causal LM."""

from zoo.models.registry import register, standard_sized
from zoo.models.rmt.configuration_rmt import RMTConfig
from zoo.models.rmt.modeling_rmt import (
    RMTCache,
    RMTForCausalLM,
    RMTForSequenceClassification,
    RMTModel,
    RMTPreTrainedModel,
)


def sized(hidden_size: int, num_layers: int) -> dict:
    """RMT over the zoo baseline transformer of this width and depth: 16 memory tokens, segments of 128."""
    backbone = {"model_type": "zoo_transformer", **standard_sized(hidden_size, num_layers)}
    return {"backbone": backbone, "num_mem_tokens": 16, "segment_length": 128}


register(
    RMTConfig,
    model=RMTModel,
    causal_lm=RMTForCausalLM,
    sequence_classification=RMTForSequenceClassification,
    # the attention projections of Llama-style backbones (zoo's included), GPT-2 and GPT-NeoX
    lora_targets=("q_proj", "v_proj", "c_attn", "query_key_value"),
    sized=sized,
)

__all__ = [
    "RMTCache",
    "RMTConfig",
    "RMTForCausalLM",
    "RMTForSequenceClassification",
    "RMTModel",
    "RMTPreTrainedModel",
]
