"""Conversion between transformers' Llama and zoo's baseline transformer.

Weight names are identical, so conversion maps the configuration and copies the state dict unchanged:

    LlamaForCausalLM                         TransformerForCausalLM
    model.embed_tokens.weight            ->  model.embed_tokens.weight
    model.layers.{i}.self_attn.*_proj    ->  model.layers.{i}.self_attn.*_proj
    model.layers.{i}.mlp.*_proj          ->  model.layers.{i}.mlp.*_proj
    model.layers.{i}.*_layernorm.weight  ->  model.layers.{i}.*_layernorm.weight
    model.norm.weight, lm_head.weight    ->  the same

Command line: ``python -m zoo.models.transformer.convert_transformer LLAMA_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse

from zoo.models.transformer.configuration_transformer import TransformerConfig
from zoo.models.transformer.modeling_transformer import TransformerForCausalLM

_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "attention_bias",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def config_from_llama(llama_config) -> TransformerConfig:
    if getattr(llama_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True Llama checkpoints are not supported by zoo_transformer")
    kwargs = {name: getattr(llama_config, name) for name in _SHARED_FIELDS}
    kwargs["rope_parameters"] = dict(llama_config.rope_parameters)
    return TransformerConfig(**kwargs)


def from_llama(llama_model) -> TransformerForCausalLM:
    """A ``TransformerForCausalLM`` holding the weights of a ``LlamaForCausalLM``."""
    model = TransformerForCausalLM(config_from_llama(llama_model.config))
    missing, unexpected = model.load_state_dict(llama_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return model.to(next(llama_model.parameters()).dtype)


def to_llama(model: TransformerForCausalLM):
    """A transformers ``LlamaForCausalLM`` holding the weights of a zoo transformer (RoPE models only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    llama_like = dict(
        position_embedding_type="rope", sliding_window=None, norm_type="rmsnorm", mlp_type="swiglu"
    )
    differ = {k: getattr(cfg, k) for k, v in llama_like.items() if getattr(cfg, k) != v}
    if differ:
        raise ValueError(f"this zoo_transformer has no Llama counterpart: {differ} (Llama has {llama_like})")
    kwargs = {name: getattr(cfg, name) for name in _SHARED_FIELDS}
    llama = LlamaForCausalLM(LlamaConfig(**kwargs, rope_parameters=dict(cfg.rope_parameters)))
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return llama.to(next(model.parameters()).dtype)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("llama_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = from_llama(LlamaForCausalLM.from_pretrained(args.llama_dir))
    model.save_pretrained(args.out_dir)
    try:
        AutoTokenizer.from_pretrained(args.llama_dir).save_pretrained(args.out_dir)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
