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


def sized(hidden_size: int, num_layers: int) -> dict:
    """A small Mamba-2-Hybrid of this width and depth: Mamba-2 layers with every other one attention (the last
    layer attention when there is one layer), an MLP after each, heads of 32 (attention) and 16 (Mamba-2)."""
    layer_types = ["mamba2" if (num_layers - i) % 2 == 0 else "attention" for i in range(num_layers)]
    return {
        "hidden_size": hidden_size,
        "layer_types": layer_types,
        "intermediate_size": 8 * max(1, round(hidden_size * 8 / 3 / 8)),
        "num_attention_heads": max(1, hidden_size // 32),
        "mamba2": {"expand": 2, "head_dim": 16, "num_heads": 2 * hidden_size // 16, "state_size": 16, "n_groups": 1},
    }


register(
    ZooHybridConfig,
    model=HybridModel,
    causal_lm=HybridForCausalLM,
    sequence_classification=HybridForSequenceClassification,
    lora_targets=("in_proj", "x_proj", "dt_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
    sized=sized,
)

__all__ = [
    "HybridCache",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
    "ZooHybridConfig",
]
