"""Reformer (Kitaev et al. 2020, arXiv:2001.04451): reversible layers of local and LSH attention, chunked
feed-forward, axial positions; causal and masked language models."""

from transformers import AutoModelForMaskedLM

from zoo.models.reformer.configuration_reformer import ZooReformerConfig
from zoo.models.reformer.modeling_reformer import (
    ZooReformerForCausalLM,
    ZooReformerForMaskedLM,
    ZooReformerForSequenceClassification,
    ZooReformerModel,
    ZooReformerPreTrainedModel,
)
from zoo.models.registry import REGISTRY, register

if ZooReformerConfig.model_type not in REGISTRY:
    AutoModelForMaskedLM.register(ZooReformerConfig, ZooReformerForMaskedLM)


def sized(hidden_size: int, num_layers: int) -> dict:
    """A small Reformer of this width and depth: local and LSH layers alternating, 32-token chunks (LSH with 2
    rounds of 8 buckets), 4x feed-forward, no dropout."""
    heads = max(1, hidden_size // 64)
    return {
        "hidden_size": hidden_size,
        "num_attention_heads": heads,
        "attention_head_size": hidden_size // heads,
        "attn_layers": ["local" if i % 2 == 0 else "lsh" for i in range(num_layers)],
        "feed_forward_size": 4 * hidden_size,
        "local_attn_chunk_length": 32,
        "lsh_attn_chunk_length": 32,
        "num_hashes": 2,
        "num_buckets": 8,
        "axial_pos_embds": False,
        "max_position_embeddings": 4096,
        "hidden_dropout_prob": 0.0,
    }


register(
    ZooReformerConfig,
    model=ZooReformerModel,
    causal_lm=ZooReformerForCausalLM,
    sequence_classification=ZooReformerForSequenceClassification,
    lora_targets=("qk_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    sized=sized,
)

__all__ = [
    "ZooReformerConfig",
    "ZooReformerForCausalLM",
    "ZooReformerForMaskedLM",
    "ZooReformerForSequenceClassification",
    "ZooReformerModel",
    "ZooReformerPreTrainedModel",
]
