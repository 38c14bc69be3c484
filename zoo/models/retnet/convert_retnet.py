"""Load Microsoft torchscale RetNet checkpoints into zoo by renaming weights (the table is in
``modeling_retnet``'s docstring).

    python -m zoo.models.retnet.convert_retnet CHECKPOINT.pt OUT_DIR --heads 4 [--value-factor 2]

A torchscale ``RetNetDecoder`` state dict (``model`` key of a fairseq/torchscale checkpoint, or a bare state dict)
becomes a ``RetNetForCausalLM`` saved with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import re

import torch

from zoo.models.retnet.configuration_retnet import RetNetConfig
from zoo.models.retnet.modeling_retnet import RetNetForCausalLM

_RULES = [
    (r"^embed_tokens\.weight$", "model.embed_tokens.weight"),
    (r"^layers\.(\d+)\.retention\.(q|k|v|g|out)_proj\.weight$", r"model.layers.\1.retention.\2_proj.weight"),
    (r"^layers\.(\d+)\.retention_layer_norm\.(weight|bias)$", r"model.layers.\1.retention_norm.\2"),
    (r"^layers\.(\d+)\.ffn\.fc1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^layers\.(\d+)\.ffn\.gate\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^layers\.(\d+)\.ffn\.fc2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"model.layers.\1.mlp_norm.\2"),
    (r"^layer_norm\.(weight|bias)$", r"model.norm.\1"),
    (r"^output_projection\.weight$", "lm_head.weight"),
]
# Buffers and bookkeeping that carry no weights.
_IGNORED = re.compile(r"(^version$|\.version$|retnet_rel_pos|^layernorm_embedding)")


def rename_torchscale_key(key: str) -> str:
    key = key.removeprefix("decoder.")
    for pattern, target in _RULES:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    raise ValueError(f"torchscale key {key!r} has no zoo counterpart")


def is_torchscale_state_dict(state_dict: dict) -> bool:
    """Whether ``state_dict`` looks like a torchscale RetNet decoder's (its retention projection names)."""
    return any(re.match(r"^(decoder\.)?layers\.\d+\.retention\.q_proj\.weight$", k) for k in state_dict)


def torchscale_to_zoo(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        rename_torchscale_key(k): v
        for k, v in state_dict.items()
        if not _IGNORED.search(k.removeprefix("decoder."))
    }


def config_from_state_dict(state_dict: dict[str, torch.Tensor], num_heads: int, **overrides) -> RetNetConfig:
    sd = torchscale_to_zoo(state_dict)
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    ffn = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    value_dim = sd["model.layers.0.retention.v_proj.weight"].shape[0]
    norm = "layernorm" if "model.layers.0.retention_norm.bias" in sd else "rmsnorm"
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        value_factor=value_dim // hidden,
        norm_type=norm,
        tie_word_embeddings="lm_head.weight" not in sd,
    )
    kwargs.update(overrides)
    return RetNetConfig(**kwargs)


def from_torchscale(state_dict: dict[str, torch.Tensor], num_heads: int, **overrides) -> RetNetForCausalLM:
    model = RetNetForCausalLM(config_from_state_dict(state_dict, num_heads, **overrides))
    missing, unexpected = model.load_state_dict(torchscale_to_zoo(state_dict), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--heads", type=int, required=True, help="decoder_retention_heads of the checkpoint")
    args = parser.parse_args(argv)
    blob = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state_dict = blob.get("model", blob)
    from_torchscale(state_dict, args.heads).save_pretrained(args.out_dir)


if __name__ == "__main__":
    main()
