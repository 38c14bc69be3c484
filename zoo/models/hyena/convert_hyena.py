"""Checkpoints of the reference Hyena (HazyResearch safari, ``src/models/sequence/hyena.py`` and
``long_conv_lm.py``) and of HyenaDNA into zoo (Poli et al., 2023, arXiv:2302.10866; Nguyen et al., 2023,
arXiv:2306.15794).

zoo keeps the reference's parameter names inside the operator, so the mapping is a renaming:

    safari / HyenaDNA                                   zoo
    backbone.embeddings.word_embeddings.weight          model.embed_tokens.weight (lm_head.weight tied to it)
    backbone.layers.{i}.norm1 / norm2                   model.layers.{i}.norm1 / norm2
    backbone.layers.{i}.mixer.{in_proj, out_proj,       model.layers.{i}.mixer.{the same}
        short_filter, filter_fn.bias, filter_fn.pos_emb.z / .t, filter_fn.implicit_filter.{0, 1, 2, 4, ...},
        filter_fn.modulation.deltas}
    backbone.layers.{i}.mixer.filter_fn.implicit_filter.{3, 5, ...}.freq   dropped: the one shared sine frequency,
                                                        stored again at every odd index (checked equal to .1.freq)
    backbone.layers.{i}.mlp.fc1 / fc2                   model.layers.{i}.mlp.up_proj / down_proj
    backbone.ln_f                                       model.norm

A leading ``model.`` (HyenaDNA's Lightning checkpoints) is removed first. Sizes are read from the weights' shapes;
what the shapes do not tell (``bias``, ``normalized``, ``modulate``, ``shift``, the LayerNorm epsilon) is taken
from keyword arguments in the reference's names, with the reference's defaults.

The reference's options that zoo's operator does not implement (``num_heads``, ``inner_factor``, ``num_blocks``
other than 1, ``outer_mixing``, ``post_order_ffn``, an activation other than identity, another filter class) are
a ValueError, not a silent approximation.
"""

from __future__ import annotations

import re

import torch

from zoo.models.hyena.configuration_hyena import HyenaConfig
from zoo.models.hyena.modeling_hyena import HyenaForCausalLM, HyenaOperator

# safari HyenaOperator / HyenaFilter keyword -> (zoo config field or None for "must keep its default", default)
_OPERATOR_KWARGS = {
    "d_model": ("hidden_size", None),
    "l_max": ("max_position_embeddings", None),
    "order": ("order", 2),
    "filter_order": ("filter_order", 64),
    "short_filter_order": ("short_filter_order", 3),
    "emb_dim": ("emb_dim", 3),
    "w": ("filter_sin_freq", 1),
    "num_inner_mlps": ("filter_inner_layers", 2),
    "bias": ("filter_bias", True),
    "normalized": ("filter_normalized", False),
    "modulate": ("filter_modulate", True),
    "fast_decay_pct": ("filter_fast_decay_pct", 0.3),
    "slow_decay_pct": ("filter_slow_decay_pct", 1.5),
    "target": ("filter_decay_target", 1e-2),
    "shift": ("filter_decay_shift", 0.0),
}
_UNSUPPORTED = {
    "num_heads": 1,
    "inner_factor": 1,
    "num_blocks": 1,
    "outer_mixing": False,
    "post_order_ffn": False,
    "activation": "id",
    "filter_cls": "hyena-filter",
    "channels": 1,
}
# training-only options of the reference: accepted and without effect on the forward
_IGNORED = {
    "dropout", "filter_dropout", "fused_bias_fc", "jit_filter", "return_state", "fused_fft_conv", "lr",
    "lr_pos_emb", "wd", "modulation_lr", "layer_idx", "device", "dtype",
}  # fmt: skip


def config_kwargs_from_safari(kwargs: dict) -> dict:
    """zoo config keywords from safari ``HyenaOperator`` keywords; ValueError for anything else."""
    out = {}
    for name, value in kwargs.items():
        if name in _OPERATOR_KWARGS:
            field = _OPERATOR_KWARGS[name][0]
            out[field] = float(value) if field == "filter_sin_freq" else value
        elif name in _UNSUPPORTED:
            if value != _UNSUPPORTED[name]:
                raise ValueError(
                    f"safari HyenaOperator option {name}={value!r} is not supported, only {_UNSUPPORTED[name]!r}"
                )
        elif name not in _IGNORED:
            raise ValueError(f"unknown safari HyenaOperator option {name!r}")
    return out


def operator_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A safari operator's weights (under ``prefix``) in zoo's names: the repeated sine frequencies dropped."""
    out = {}
    freq = state_dict.get(f"{prefix}filter_fn.implicit_filter.1.freq")
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        m = re.fullmatch(r"filter_fn\.implicit_filter\.(\d+)\.freq", name)
        if m and m.group(1) != "1":
            if freq is None or not torch.equal(value, freq):
                raise ValueError(
                    f"{key}: the filter network's sine frequency differs from implicit_filter.1.freq"
                )
            continue
        out[name] = value
    return out


def _filter_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Hidden layers of the filter network: its linear layers but the first and the last."""
    linear = [
        k for k in sd if re.fullmatch(re.escape(prefix) + r"filter_fn\.implicit_filter\.\d+\.weight", k)
    ]
    return len(linear) - 2


def operator_from_safari(state_dict: dict[str, torch.Tensor], **kwargs) -> HyenaOperator:
    """zoo's ``HyenaOperator`` with the weights of a safari ``HyenaOperator(**kwargs)``'s ``state_dict``: the same
    (B, L, D) -> (B, L, D) forward. ``kwargs`` are the reference constructor's own names (``d_model``, ``l_max``,
    ``order``, ``filter_order``, ``emb_dim``, ``w``, ``short_filter_order``, ``num_inner_mlps``, ``bias``,
    ``normalized``, ``modulate``, ``shift``, ...)."""
    for name in ("d_model", "l_max"):
        if name not in kwargs:
            raise ValueError(f"operator_from_safari needs {name}=, as safari's HyenaOperator does")
    fields = config_kwargs_from_safari(kwargs)
    fields.setdefault("filter_inner_layers", _filter_layers(state_dict, ""))
    config = HyenaConfig(num_hidden_layers=1, **fields)
    operator = HyenaOperator(config)
    missing, unexpected = operator.load_state_dict(operator_state_dict(state_dict), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"safari HyenaOperator weights do not fit: missing {missing}, unexpected {unexpected}"
        )
    return operator


def is_safari_state_dict(state_dict: dict) -> bool:
    """Whether the keys are a safari / HyenaDNA Hyena language model's."""
    return any(
        re.fullmatch(r"(model\.)?backbone\.layers\.0\.mixer\.filter_fn\.implicit_filter\.0\.weight", k)
        for k in state_dict
    )


def from_safari(state_dict: dict[str, torch.Tensor], **kwargs) -> HyenaForCausalLM:
    """A ``HyenaForCausalLM`` from a safari ``ConvLMHeadModel`` / HyenaDNA ``state_dict`` (Hyena layers only).
    ``kwargs``: safari operator options the shapes do not tell, and ``layer_norm_epsilon``."""
    sd = {re.sub(r"^model\.", "", k): v for k, v in state_dict.items()}
    if any(".mixer.Wqkv." in k or ".mixer.q_proj." in k for k in sd):
        raise ValueError("the checkpoint has attention layers; only all-Hyena models convert")
    embed = sd["backbone.embeddings.word_embeddings.weight"]
    vocab, d = embed.shape
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))})
    p = "backbone.layers.0.mixer."
    fc1 = sd["backbone.layers.0.mlp.fc1.weight"]
    z = sd[p + "filter_fn.pos_emb.z"]
    first = sd[p + "filter_fn.implicit_filter.0.weight"]
    shapes = {
        "d_model": d,
        "l_max": z.shape[1],
        "order": sd[p + "in_proj.weight"].shape[0] // d - 1,
        "filter_order": first.shape[0],
        "emb_dim": first.shape[1],
        "short_filter_order": sd[p + "short_filter.weight"].shape[-1],
        "num_inner_mlps": _filter_layers(sd, p),
    }
    eps = kwargs.pop("layer_norm_epsilon", 1e-5)
    fields = config_kwargs_from_safari({**shapes, **kwargs})
    config = HyenaConfig(
        vocab_size=vocab, num_hidden_layers=len(layers), intermediate_size=fc1.shape[0], layer_norm_epsilon=eps,
        tie_word_embeddings=True, **fields,
    )  # fmt: skip
    new = {"model.embed_tokens.weight": embed, "model.norm.weight": sd["backbone.ln_f.weight"]}
    new["model.norm.bias"] = sd["backbone.ln_f.bias"]
    for i in layers:
        src, dst = f"backbone.layers.{i}.", f"model.layers.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            new[dst + name] = sd[src + name]
        for a, b in (("fc1", "up_proj"), ("fc2", "down_proj")):
            new[f"{dst}mlp.{b}.weight"] = sd[f"{src}mlp.{a}.weight"]
            new[f"{dst}mlp.{b}.bias"] = sd[f"{src}mlp.{a}.bias"]
        for name, value in operator_state_dict(sd, src + "mixer.").items():
            new[dst + "mixer." + name] = value
    model = HyenaForCausalLM(config)
    missing, unexpected = model.load_state_dict(new, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied
    if missing or unexpected:
        raise ValueError(f"safari Hyena weights do not fit: missing {missing}, unexpected {unexpected}")
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], embed):
        raise ValueError(
            "lm_head.weight differs from the word embeddings; zoo's Hyena ties them as safari does"
        )
    return model.eval()


__all__ = ["from_safari", "is_safari_state_dict", "operator_from_safari", "operator_state_dict"]
