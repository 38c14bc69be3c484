"""Mamba (selective state spaces)."""

from zoo.models.mamba.configuration_mamba import ZooMambaConfig
from zoo.models.mamba.modeling_mamba import (
    MambaForCausalLM,
    MambaForSequenceClassification,
    MambaModel,
    MambaPreTrainedModel,
)
from zoo.models.registry import register

register(
    ZooMambaConfig,
    model=MambaModel,
    causal_lm=MambaForCausalLM,
    sequence_classification=MambaForSequenceClassification,
    lora_targets=("in_proj", "x_proj", "dt_proj", "out_proj"),
)

__all__ = [
    "ZooMambaConfig",
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaModel",
    "MambaPreTrainedModel",
]
