"""Longformer (Beltagy et al. 2020, arXiv:2004.05150): sliding-window and global attention; encoder heads and a
causal sliding-window language model."""

from transformers import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForTokenClassification,
)

from zoo.models.longformer.configuration_longformer import ZooLongformerConfig
from zoo.models.longformer.modeling_longformer import (
    ZooLongformerForCausalLM,
    ZooLongformerForMaskedLM,
    ZooLongformerForQuestionAnswering,
    ZooLongformerForSequenceClassification,
    ZooLongformerForTokenClassification,
    ZooLongformerModel,
    ZooLongformerPreTrainedModel,
)
from zoo.models.registry import REGISTRY, register

if ZooLongformerConfig.model_type not in REGISTRY:
    # the registry knows the causal LM and sequence-classification slots; the encoder heads register here
    AutoModelForMaskedLM.register(ZooLongformerConfig, ZooLongformerForMaskedLM)
    AutoModelForQuestionAnswering.register(ZooLongformerConfig, ZooLongformerForQuestionAnswering)
    AutoModelForTokenClassification.register(ZooLongformerConfig, ZooLongformerForTokenClassification)

register(
    ZooLongformerConfig,
    model=ZooLongformerModel,
    causal_lm=ZooLongformerForCausalLM,
    sequence_classification=ZooLongformerForSequenceClassification,
    lora_targets=(
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "q_global_proj",
        "k_global_proj",
        "v_global_proj",
        "up_proj",
        "down_proj",
    ),
)

__all__ = [
    "ZooLongformerConfig",
    "ZooLongformerForCausalLM",
    "ZooLongformerForMaskedLM",
    "ZooLongformerForQuestionAnswering",
    "ZooLongformerForSequenceClassification",
    "ZooLongformerForTokenClassification",
    "ZooLongformerModel",
    "ZooLongformerPreTrainedModel",
]
