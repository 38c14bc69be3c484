"""RWKV, versions 4, 6 and 7 (one config, ``version`` selects the time mixing)."""

from zoo.models.registry import register
from zoo.models.rwkv.configuration_rwkv import ZooRwkvConfig
from zoo.models.rwkv.modeling_rwkv import (
    ZooRwkvForCausalLM,
    ZooRwkvForSequenceClassification,
    ZooRwkvModel,
    ZooRwkvPreTrainedModel,
)

register(
    ZooRwkvConfig,
    model=ZooRwkvModel,
    causal_lm=ZooRwkvForCausalLM,
    sequence_classification=ZooRwkvForSequenceClassification,
    lora_targets=("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
)

__all__ = [
    "ZooRwkvConfig",
    "ZooRwkvForCausalLM",
    "ZooRwkvForSequenceClassification",
    "ZooRwkvModel",
    "ZooRwkvPreTrainedModel",
]
