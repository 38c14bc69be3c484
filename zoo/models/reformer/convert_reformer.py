"""Conversion from transformers' ``ReformerModelWithLMHead`` / ``ReformerForMaskedLM`` to zoo's
``ZooReformerForCausalLM`` / ``ZooReformerForMaskedLM`` (Reformer: Kitaev et al. 2020, arXiv:2001.04451), by
renaming:

    transformers                                                    zoo
    reformer.embeddings.word_embeddings                         ->  model.embed_tokens
    reformer.embeddings.position_embeddings.weights.{0, 1}      ->  model.embed_positions.{rows, cols} (squeezed)
    reformer.embeddings.position_embeddings.embedding           ->  model.embed_positions
    reformer.encoder.layers.{i}.attention.layer_norm            ->  model.layers.{i}.attention.norm
    reformer.encoder.layers.{i}.attention.self_attention.{query_key, query, key, value}
                                                                ->  model.layers.{i}.attention.attention.{qk, q, k, v}_proj
    reformer.encoder.layers.{i}.attention.output.dense          ->  model.layers.{i}.attention.o_proj
    reformer.encoder.layers.{i}.feed_forward.layer_norm         ->  model.layers.{i}.feed_forward.norm
    reformer.encoder.layers.{i}.feed_forward.dense.dense        ->  model.layers.{i}.feed_forward.up_proj
    reformer.encoder.layers.{i}.feed_forward.output.dense       ->  model.layers.{i}.feed_forward.down_proj
    reformer.encoder.layer_norm                                 ->  model.norm
    lm_head.decoder                                             ->  lm_head.decoder

transformers' ``lm_head.bias`` is a parameter its forward never adds (the decoder's own bias is the one applied), so
it is dropped. The config is converted with ``transformers_compat=True``: rotations drawn as transformers draws them
(every LSH layer seeded with ``hash_seed``), and an unset ``num_buckets`` chosen from the first long input.

``python -m zoo.convert REFORMER_DIR OUT_DIR`` dispatches here for ``model_type: reformer``. :func:`to_transformers`
goes back (the benchmark's same-weights reference), for a zoo model that hashes as transformers does.
"""

from __future__ import annotations

import re

import torch

from zoo.models.reformer.configuration_reformer import ZooReformerConfig
from zoo.models.reformer.modeling_reformer import ZooReformerForCausalLM, ZooReformerForMaskedLM

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "attention_head_size",
    "feed_forward_size",
    "hidden_act",
    "chunk_size_feed_forward",
    "local_attn_chunk_length",
    "local_num_chunks_before",
    "local_num_chunks_after",
    "lsh_attn_chunk_length",
    "lsh_num_chunks_before",
    "lsh_num_chunks_after",
    "num_hashes",
    "num_buckets",
    "hash_seed",
    "is_decoder",
    "axial_pos_embds",
    "axial_norm_std",
    "max_position_embeddings",
    "hidden_dropout_prob",
    "local_attention_probs_dropout_prob",
    "lsh_attention_probs_dropout_prob",
    "layer_norm_eps",
    "initializer_range",
    "classifier_dropout",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)

_LAYER = r"reformer\.encoder\.layers\.(\d+)\."
RENAMES = (
    (r"reformer\.embeddings\.word_embeddings", "model.embed_tokens"),
    (r"reformer\.embeddings\.position_embeddings\.weights\.0", "model.embed_positions.rows"),
    (r"reformer\.embeddings\.position_embeddings\.weights\.1", "model.embed_positions.cols"),
    (r"reformer\.embeddings\.position_embeddings\.embedding", "model.embed_positions"),
    (_LAYER + r"attention\.layer_norm", r"model.layers.\1.attention.norm"),
    (_LAYER + r"attention\.self_attention\.query_key", r"model.layers.\1.attention.attention.qk_proj"),
    (_LAYER + r"attention\.self_attention\.(query|key|value)", None),
    (_LAYER + r"attention\.output\.dense", r"model.layers.\1.attention.o_proj"),
    (_LAYER + r"feed_forward\.layer_norm", r"model.layers.\1.feed_forward.norm"),
    (_LAYER + r"feed_forward\.dense\.dense", r"model.layers.\1.feed_forward.up_proj"),
    (_LAYER + r"feed_forward\.output\.dense", r"model.layers.\1.feed_forward.down_proj"),
    (r"reformer\.encoder\.layer_norm", "model.norm"),
    (r"lm_head\.decoder", "lm_head.decoder"),
)
_QKV = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


class TransformersReformer:
    """Loads a transformers Reformer folder with its LM head: ``ReformerModelWithLMHead`` when the config is a
    decoder, else ``ReformerForMaskedLM`` (what ``python -m zoo.convert`` converts from)."""

    @staticmethod
    def from_pretrained(src, **kwargs):
        import transformers

        config = transformers.AutoConfig.from_pretrained(src)
        name = "ReformerModelWithLMHead" if config.is_decoder else "ReformerForMaskedLM"
        return getattr(transformers, name).from_pretrained(src, **kwargs)


def config_from_transformers(hf_config) -> ZooReformerConfig:
    """zoo's config of a transformers ``ReformerConfig`` (``transformers_compat`` on)."""
    fields = {name: getattr(hf_config, name) for name in _SHARED_FIELDS}
    if isinstance(fields["num_buckets"], tuple):
        fields["num_buckets"] = list(fields["num_buckets"])
    return ZooReformerConfig(
        **fields,
        attn_layers=list(hf_config.attn_layers),
        axial_pos_shape=list(hf_config.axial_pos_shape),
        axial_pos_embds_dim=list(hf_config.axial_pos_embds_dim),
        transformers_compat=True,
    )


def rename_key(key: str) -> str | None:
    """zoo's name of a transformers parameter (None: dropped)."""
    if key == "lm_head.bias":
        return None
    for pattern, repl in RENAMES:
        m = re.match(pattern + r"(\.weight|\.bias|)$", key)
        if not m:
            continue
        if repl is None:  # local attention's q / k / v, or LSH's value
            layer, which = m.group(1), m.group(2)
            return f"model.layers.{layer}.attention.attention.{_QKV[which]}{m.group(3)}"
        prefix = re.sub(pattern, repl, key[: len(key) - len(m.group(m.lastindex))])
        return prefix + m.group(m.lastindex)
    raise ValueError(f"convert_reformer: no zoo name for transformers parameter {key!r}")


def from_transformers(hf_model) -> ZooReformerForCausalLM | ZooReformerForMaskedLM:
    """zoo's model of a transformers ``ReformerModelWithLMHead`` (causal) or ``ReformerForMaskedLM``."""
    config = config_from_transformers(hf_model.config)
    cls = ZooReformerForCausalLM if config.is_decoder else ZooReformerForMaskedLM
    model = cls(config)
    state = {}
    for key, value in hf_model.state_dict().items():
        name = rename_key(key)
        if name is None:
            continue
        if name.startswith("model.embed_positions.rows") or name.startswith("model.embed_positions.cols"):
            value = value.reshape(value.shape[0] * value.shape[1], value.shape[-1])
        state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotations")]
    if missing or unexpected:
        raise ValueError(f"convert_reformer: missing {missing}, unexpected {unexpected}")
    return model.to(hf_model.dtype).eval()


def config_to_transformers(config: ZooReformerConfig):
    """transformers' ``ReformerConfig`` of a zoo config; ValueError where transformers would compute otherwise."""
    from transformers import ReformerConfig

    if "lsh" in config.attn_layers and not config.transformers_compat:
        raise ValueError(
            "to_transformers: transformers_compat=False hashes with zoo's per-layer rotation buffers, which "
            "transformers' Reformer cannot hold (it re-draws one rotation from hash_seed in every layer); build "
            "the zoo model with transformers_compat=True"
        )
    if config.tie_word_embeddings:
        raise ValueError(
            "to_transformers: tie_word_embeddings=True (zoo's tied head reads the sum of the two streams); "
            "transformers' Reformer head reads their concatenation"
        )
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    return ReformerConfig(
        **fields,
        attn_layers=list(config.attn_layers),
        axial_pos_shape=list(config.axial_pos_shape),
        axial_pos_embds_dim=list(config.axial_pos_embds_dim),
    )


def to_transformers(model: ZooReformerForCausalLM | ZooReformerForMaskedLM):
    """A transformers ``ReformerModelWithLMHead`` (causal) or ``ReformerForMaskedLM`` with the zoo model's
    weights (``lm_head.bias``, which transformers never applies, left at zero)."""
    import transformers

    hf_config = config_to_transformers(model.config)
    name = "ReformerModelWithLMHead" if hf_config.is_decoder else "ReformerForMaskedLM"
    hf = getattr(transformers, name)(hf_config)
    ours = model.state_dict()
    state = {}
    for key, value in hf.state_dict().items():
        zoo_name = rename_key(key)
        if zoo_name is None:
            state[key] = torch.zeros_like(value)
            continue
        if zoo_name not in ours:
            raise ValueError(f"to_transformers: no zoo weight {zoo_name!r} for transformers' {key!r}")
        state[key] = ours[zoo_name].reshape(value.shape)
    hf.load_state_dict(state)
    return hf.to(next(model.parameters()).dtype).eval()


__all__ = [
    "TransformersReformer",
    "config_from_transformers",
    "config_to_transformers",
    "from_transformers",
    "rename_key",
    "to_transformers",
]
