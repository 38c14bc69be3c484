"""Mamba/attention hybrids (Samba, Mamba-2-Hybrid / Bamba): one ``layer_types`` entry per layer."""

from zoo.models.hybrid.configuration_hybrid import ZooHybridConfig
from zoo.models.hybrid.modeling_hybrid import (
    HybridCache,
    HybridForCausalLM,
    HybridForSequenceClassification,
    HybridModel,
    HybridPreTrainedModel,
)
from zoo.models.registry import register

register(
    ZooHybridConfig,
    model=HybridModel,
    causal_lm=HybridForCausalLM,
    sequence_classification=HybridForSequenceClassification,
    lora_targets=("in_proj", "x_proj", "dt_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
)

__all__ = [
    "HybridCache",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
    "ZooHybridConfig",
]
