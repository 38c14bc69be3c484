"""Mamba-2 (state-space duality)."""

from zoo.models.mamba2.configuration_mamba2 import ZooMamba2Config
from zoo.models.mamba2.modeling_mamba2 import (
    Mamba2ForCausalLM,
    Mamba2ForSequenceClassification,
    Mamba2Model,
    Mamba2PreTrainedModel,
)
from zoo.models.registry import register


def sized(hidden_size: int, num_layers: int) -> dict:
    """A small Mamba-2 of this width and depth: expand 2, heads of 16 channels, state 16, one B/C group."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "expand": 2,
        "head_dim": 16,
        "num_heads": 2 * hidden_size // 16,
        "state_size": 16,
        "n_groups": 1,
    }


register(
    ZooMamba2Config,
    model=Mamba2Model,
    causal_lm=Mamba2ForCausalLM,
    sequence_classification=Mamba2ForSequenceClassification,
    lora_targets=("in_proj", "out_proj"),
    sized=sized,
)

__all__ = [
    "Mamba2ForCausalLM",
    "Mamba2ForSequenceClassification",
    "Mamba2Model",
    "Mamba2PreTrainedModel",
    "ZooMamba2Config",
]
