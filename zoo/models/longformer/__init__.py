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
    extend_position_embeddings,
)
from zoo.models.registry import REGISTRY, register

if ZooLongformerConfig.model_type not in REGISTRY:
    # the registry knows the causal LM and sequence-classification slots; the encoder heads register here
    AutoModelForMaskedLM.register(ZooLongformerConfig, ZooLongformerForMaskedLM)
    AutoModelForQuestionAnswering.register(ZooLongformerConfig, ZooLongformerForQuestionAnswering)
    AutoModelForTokenClassification.register(ZooLongformerConfig, ZooLongformerForTokenClassification)


def sized(hidden_size: int, num_layers: int) -> dict:
    """A small Longformer of this width and depth: the standard widths, a 32-token window (sliding within any
    training length above it), no dropout."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": max(1, hidden_size // 32),
        "intermediate_size": 4 * hidden_size,
        "attention_window": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


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
    sized=sized,
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
    "extend_position_embeddings",
]
