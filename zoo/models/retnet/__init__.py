"""RetNet (multi-scale retention), fixed or data-dependent decay."""

from zoo.models.registry import register
from zoo.models.retnet.configuration_retnet import RetNetConfig
from zoo.models.retnet.modeling_retnet import (
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetModel,
    RetNetPreTrainedModel,
)

register(
    RetNetConfig,
    model=RetNetModel,
    causal_lm=RetNetForCausalLM,
    sequence_classification=RetNetForSequenceClassification,
    lora_targets=("q_proj", "k_proj", "v_proj", "g_proj", "out_proj", "gate_proj", "up_proj", "down_proj"),
)

__all__ = [
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetModel",
    "RetNetPreTrainedModel",
]
