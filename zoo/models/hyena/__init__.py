"""Hyena (implicit long convolutions with gating) and HyenaDNA."""

from zoo.models.hyena.configuration_hyena import HyenaConfig
from zoo.models.hyena.modeling_hyena import (
    HyenaForCausalLM,
    HyenaForSequenceClassification,
    HyenaModel,
    HyenaOperator,
    HyenaPreTrainedModel,
)
from zoo.models.registry import register


def sized(hidden_size: int, num_layers: int) -> dict:
    """A Hyena of this width and depth: order 2, the MLP 4x as wide, safari's filter network (width 64)."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": 4 * hidden_size,
        "filter_order": 64,
    }


register(
    HyenaConfig,
    model=HyenaModel,
    causal_lm=HyenaForCausalLM,
    sequence_classification=HyenaForSequenceClassification,
    lora_targets=("in_proj", "out_proj", "up_proj", "down_proj"),
    sized=sized,
)

__all__ = [
    "HyenaConfig",
    "HyenaForCausalLM",
    "HyenaForSequenceClassification",
    "HyenaModel",
    "HyenaOperator",
    "HyenaPreTrainedModel",
]
