"""Conversion between transformers' ``BambaForCausalLM`` (IBM's Bamba, a Mamba-2-Hybrid) and zoo's hybrid, both
ways. Bamba's layers are zoo's ``"mamba2"`` / ``"attention"`` blocks with an MLP after each, under the same
names; only the final norm is renamed:

    transformers                                   zoo
    model.embed_tokens.weight                  <-> model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight    <-> model.layers.{i}.input_layernorm.weight
    model.layers.{i}.mamba.*                   <-> model.layers.{i}.mamba.*      (Mamba-2 mixer: in_proj, conv1d,
                                                                                 dt_bias, A_log, D, norm, out_proj)
    model.layers.{i}.self_attn.{q,k,v,o}_proj  <-> model.layers.{i}.self_attn.{q,k,v,o}_proj
    model.layers.{i}.pre_ff_layernorm.weight   <-> model.layers.{i}.pre_ff_layernorm.weight
    model.layers.{i}.feed_forward.*            <-> model.layers.{i}.feed_forward.*  (gate_proj, up_proj, down_proj)
    model.final_layernorm.weight               <-> model.norm.weight
    lm_head.weight                             <-> lm_head.weight

``python -m zoo.convert BAMBA_DIR OUT_DIR`` dispatches here for ``model_type: bamba``, and back for a
``zoo_hybrid`` folder whose layers Bamba can express. ``mamba_chunk_size`` is not carried over (as Mamba-2's
``chunk_size``, ``zoo.models.mamba2.convert_mamba2``).
"""

from __future__ import annotations

import math

from transformers.utils import logging

from zoo.models.hybrid.configuration_hybrid import ZooHybridConfig
from zoo.models.hybrid.modeling_hybrid import HybridForCausalLM
from zoo.models.mamba.convert_mamba import load_renamed

logger = logging.get_logger(__name__)

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "initializer_range",
    "rms_norm_eps",
    "max_position_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Bamba's Mamba-2 fields -> the fields of zoo's Mamba-2 mixer
_MAMBA2_FIELDS = (
    ("mamba_n_heads", "num_heads"),
    ("mamba_d_head", "head_dim"),
    ("mamba_d_state", "state_size"),
    ("mamba_n_groups", "n_groups"),
    ("mamba_expand", "expand"),
    ("mamba_d_conv", "conv_kernel"),
    ("mamba_conv_bias", "use_conv_bias"),
    ("mamba_proj_bias", "use_bias"),
)
RENAMES = (("model.final_layernorm.", "model.norm."),)
_NO_LIMIT = (0.0, math.inf)


def config_from_transformers(config) -> ZooHybridConfig:
    if config.model_type != "bamba":
        raise ValueError(
            f"expected a transformers Bamba config (model_type 'bamba'), got {config.model_type!r}"
        )
    if config.z_loss_coefficient:
        logger.warning(
            "Bamba's z_loss_coefficient=%s is a training loss term; zoo's hybrid does not add it",
            config.z_loss_coefficient,
        )
    mamba2 = {zoo_name: getattr(config, name) for name, zoo_name in _MAMBA2_FIELDS}
    limit = tuple(config.time_step_limit) if config.time_step_limit is not None else _NO_LIMIT
    if limit != _NO_LIMIT:
        mamba2["time_step_limit"] = list(limit)
    attention = set(config.attn_layer_indices or ())
    return ZooHybridConfig(
        **{name: getattr(config, name) for name in _SHARED_FIELDS},
        layer_types=["attention" if i in attention else "mamba2" for i in range(config.num_hidden_layers)],
        mlp_layers=True,
        rope_parameters=dict(config.rope_parameters),
        mamba2=mamba2,
    )


def config_to_transformers(config: ZooHybridConfig):
    from transformers import BambaConfig

    unsupported = sorted(set(config.layer_types) - {"mamba2", "attention"})
    if unsupported:
        raise ValueError(f"Bamba has only 'mamba2' and 'attention' layers; layer_types has {unsupported}")
    if config.mlp_layers is not True and not all(config.mlp_layers):
        raise ValueError("Bamba has an MLP after every layer; mlp_layers must be True")
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        raise ValueError(
            f"Bamba's head_dim is hidden_size // num_attention_heads, got head_dim={config.head_dim}"
        )
    mamba2 = config.mixer_config("mamba2")
    if mamba2.hidden_act != config.hidden_act:
        raise ValueError("Bamba's Mamba-2 layers use the model's hidden_act; mamba2['hidden_act'] differs")
    rope = dict(config.rope_parameters)
    partial = rope.pop("partial_rotary_factor", 1.0)
    if partial != 0.5:
        raise ValueError(f"Bamba rotates half of each head (partial_rotary_factor 0.5), got {partial}")
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    fields.update({name: getattr(mamba2, zoo_name) for name, zoo_name in _MAMBA2_FIELDS})
    if mamba2.chunk_size is not None:  # otherwise transformers' default (see zoo.models.mamba2.convert_mamba2)
        fields["mamba_chunk_size"] = mamba2.chunk_size
    return BambaConfig(
        **fields,
        attn_layer_indices=[i for i, t in enumerate(config.layer_types) if t == "attention"],
        time_step_limit=tuple(mamba2.time_step_limit),
        rope_parameters=rope,
    )


def from_transformers(hf_model) -> HybridForCausalLM:
    """A zoo ``HybridForCausalLM`` holding the weights of a transformers ``BambaForCausalLM``."""
    model = HybridForCausalLM(config_from_transformers(hf_model.config))
    load_renamed(model, hf_model.state_dict(), RENAMES)
    return model.to(next(hf_model.parameters()).dtype)


def to_transformers(model: HybridForCausalLM):
    """A transformers ``BambaForCausalLM`` holding the weights of a zoo hybrid of Mamba-2 and attention layers."""
    from transformers import BambaForCausalLM

    hf = BambaForCausalLM(config_to_transformers(model.config))
    load_renamed(hf, model.state_dict(), tuple((new, old) for old, new in RENAMES))
    return hf.to(next(model.parameters()).dtype)
