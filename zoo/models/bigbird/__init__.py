"""BigBird (Zaheer et al. 2020, arXiv:2007.14062): block-sparse attention with window, global and random blocks;
encoder heads and a causal block-sparse language model."""

from transformers import AutoModelForMaskedLM, AutoModelForQuestionAnswering

from zoo.models.bigbird.configuration_bigbird import ZooBigBirdConfig
from zoo.models.bigbird.modeling_bigbird import (
    ZooBigBirdForCausalLM,
    ZooBigBirdForMaskedLM,
    ZooBigBirdForQuestionAnswering,
    ZooBigBirdForSequenceClassification,
    ZooBigBirdModel,
    ZooBigBirdPreTrainedModel,
    extend_position_embeddings,
)
from zoo.models.registry import REGISTRY, register

if ZooBigBirdConfig.model_type not in REGISTRY:
    # the registry knows the causal LM and sequence-classification slots; the encoder heads register here
    AutoModelForMaskedLM.register(ZooBigBirdConfig, ZooBigBirdForMaskedLM)
    AutoModelForQuestionAnswering.register(ZooBigBirdConfig, ZooBigBirdForQuestionAnswering)


def sized(hidden_size: int, num_layers: int) -> dict:
    """A small BigBird of this width and depth: the standard widths, 16-token blocks (3-block window, one global
    block at each end, 2 random blocks), no dropout."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": max(1, hidden_size // 32),
        "intermediate_size": 4 * hidden_size,
        "block_size": 16,
        "num_random_blocks": 2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


register(
    ZooBigBirdConfig,
    model=ZooBigBirdModel,
    causal_lm=ZooBigBirdForCausalLM,
    sequence_classification=ZooBigBirdForSequenceClassification,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    sized=sized,
)

__all__ = [
    "ZooBigBirdConfig",
    "ZooBigBirdForCausalLM",
    "ZooBigBirdForMaskedLM",
    "ZooBigBirdForQuestionAnswering",
    "ZooBigBirdForSequenceClassification",
    "ZooBigBirdModel",
    "ZooBigBirdPreTrainedModel",
    "extend_position_embeddings",
]
