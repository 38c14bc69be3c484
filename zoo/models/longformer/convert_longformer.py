"""Conversion between transformers' ``LongformerForMaskedLM`` and zoo's ``ZooLongformerForMaskedLM``, both ways, by
renaming (Longformer: Beltagy et al. 2020, arXiv:2004.05150):

    transformers                                              zoo
    longformer.embeddings.word_embeddings                 <-> model.embed_tokens
    longformer.embeddings.position_embeddings             <-> model.embed_positions
    longformer.embeddings.token_type_embeddings           <-> model.embed_token_types
    longformer.embeddings.LayerNorm                       <-> model.embed_norm
    longformer.encoder.layer.{i}.attention.self.{query, key, value}
                                                          <-> model.layers.{i}.self_attn.{q, k, v}_proj
    longformer.encoder.layer.{i}.attention.self.{query, key, value}_global
                                                          <-> model.layers.{i}.self_attn.{q, k, v}_global_proj
    longformer.encoder.layer.{i}.attention.output.dense   <-> model.layers.{i}.self_attn.o_proj
    longformer.encoder.layer.{i}.attention.output.LayerNorm <-> model.layers.{i}.attn_norm
    longformer.encoder.layer.{i}.intermediate.dense       <-> model.layers.{i}.up_proj
    longformer.encoder.layer.{i}.output.dense             <-> model.layers.{i}.down_proj
    longformer.encoder.layer.{i}.output.LayerNorm         <-> model.layers.{i}.mlp_norm
    lm_head.{dense, layer_norm, decoder}, lm_head.bias    <-> lm_head.{dense, norm, decoder}, lm_head.decoder.bias

``python -m zoo.convert LONGFORMER_DIR OUT_DIR`` dispatches here for ``model_type: longformer`` (and back for
``zoo_longformer``).
"""

from __future__ import annotations

import re

from zoo.models.longformer.configuration_longformer import ZooLongformerConfig
from zoo.models.longformer.modeling_longformer import ZooLongformerForMaskedLM

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "attention_window",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "tie_word_embeddings",
)

_LAYER = r"longformer\.encoder\.layer\.(\d+)\."
# (transformers pattern, zoo replacement); applied to the part of a key before ".weight" / ".bias"
RENAMES = (
    (r"longformer\.embeddings\.word_embeddings", "model.embed_tokens"),
    (r"longformer\.embeddings\.position_embeddings", "model.embed_positions"),
    (r"longformer\.embeddings\.token_type_embeddings", "model.embed_token_types"),
    (r"longformer\.embeddings\.LayerNorm", "model.embed_norm"),
    (_LAYER + r"attention\.self\.query", r"model.layers.\1.self_attn.q_proj"),
    (_LAYER + r"attention\.self\.key", r"model.layers.\1.self_attn.k_proj"),
    (_LAYER + r"attention\.self\.value", r"model.layers.\1.self_attn.v_proj"),
    (_LAYER + r"attention\.self\.query_global", r"model.layers.\1.self_attn.q_global_proj"),
    (_LAYER + r"attention\.self\.key_global", r"model.layers.\1.self_attn.k_global_proj"),
    (_LAYER + r"attention\.self\.value_global", r"model.layers.\1.self_attn.v_global_proj"),
    (_LAYER + r"attention\.output\.dense", r"model.layers.\1.self_attn.o_proj"),
    (_LAYER + r"attention\.output\.LayerNorm", r"model.layers.\1.attn_norm"),
    (_LAYER + r"intermediate\.dense", r"model.layers.\1.up_proj"),
    (_LAYER + r"output\.dense", r"model.layers.\1.down_proj"),
    (_LAYER + r"output\.LayerNorm", r"model.layers.\1.mlp_norm"),
    (r"lm_head\.dense", "lm_head.dense"),
    (r"lm_head\.layer_norm", "lm_head.norm"),
    (r"lm_head\.decoder", "lm_head.decoder"),
)


def _to_zoo_name(name: str) -> str | None:
    module, _, leaf = name.rpartition(".")
    if (
        name == "lm_head.bias"
    ):  # transformers keeps the decoder's bias twice (lm_head.bias is lm_head.decoder.bias)
        return "lm_head.decoder.bias"
    for pattern, replacement in RENAMES:
        if re.fullmatch(pattern, module):
            return re.sub(pattern, replacement, module) + "." + leaf
    return None


def config_from_transformers(hf_config) -> ZooLongformerConfig:
    """The ``ZooLongformerConfig`` of a transformers ``LongformerConfig``."""
    fields = {name: getattr(hf_config, name) for name in _SHARED_FIELDS}
    window = fields["attention_window"]
    fields["attention_window"] = (
        [window] * hf_config.num_hidden_layers if isinstance(window, int) else list(window)
    )
    return ZooLongformerConfig(**fields)


def from_transformers(hf_model) -> ZooLongformerForMaskedLM:
    """A ``ZooLongformerForMaskedLM`` holding the weights of a transformers ``LongformerForMaskedLM``."""
    model = ZooLongformerForMaskedLM(config_from_transformers(hf_model.config))
    state, unknown = {}, []
    for name, tensor in hf_model.state_dict().items():
        new = _to_zoo_name(name)
        if new is None:
            unknown.append(name)
        else:
            state[new] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.decoder.weight" and model.config.tie_word_embeddings)]
    if unknown or missing or unexpected:
        raise ValueError(f"weights do not map: unknown {unknown}, missing {missing}, unexpected {unexpected}")
    return model.to(next(hf_model.parameters()).dtype)


def to_transformers(model: ZooLongformerForMaskedLM):
    """A transformers ``LongformerForMaskedLM`` holding the weights of a zoo Longformer (bidirectional)."""
    from transformers import LongformerConfig, LongformerForMaskedLM

    if model.config.causal:
        raise ValueError(
            "a causal zoo_longformer has no transformers counterpart (LongformerForMaskedLM attends both ways)"
        )
    fields = {name: getattr(model.config, name) for name in _SHARED_FIELDS}
    hf = LongformerForMaskedLM(LongformerConfig(**fields))
    renamed = {}
    for hf_name in hf.state_dict():
        zoo_name = _to_zoo_name(hf_name)
        if zoo_name is None:
            raise ValueError(f"no zoo weight for transformers' {hf_name}")
        renamed[hf_name] = model.state_dict()[zoo_name]
    hf.load_state_dict(renamed)
    return hf.to(next(model.parameters()).dtype)
