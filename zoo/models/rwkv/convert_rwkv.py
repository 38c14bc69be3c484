"""Conversion of RWKV checkpoints into zoo and back, by renaming (and reshaping vectors):

- transformers' ``RwkvForCausalLM`` (RWKV-4, arXiv:2305.13048) <-> zoo version 4::

    rwkv.embeddings.weight                      <-> model.embed_tokens.weight
    rwkv.blocks.0.pre_ln.*                      <-> model.pre_norm.*
    rwkv.blocks.{i}.ln1.* / ln2.*               <-> model.layers.{i}.attn_norm.* / ffn_norm.*
    rwkv.blocks.{i}.attention.{key,value,receptance,output}.weight
                                                <-> model.layers.{i}.attn.{k,v,r,o}_proj.weight
    rwkv.blocks.{i}.attention.time_{decay,first}  <-> model.layers.{i}.attn.time_{decay,first}
    rwkv.blocks.{i}.attention.time_mix_{key,value,receptance} (1, 1, C)
                                                <-> model.layers.{i}.attn.time_mix_{k,v,r} (C,)
    rwkv.blocks.{i}.feed_forward.{key,value,receptance}.weight  <-> model.layers.{i}.ffn.(the same)
    rwkv.blocks.{i}.feed_forward.time_mix_{key,receptance}      <-> model.layers.{i}.ffn.time_mix_{k,r}
    rwkv.ln_out.* / head.weight                 <-> model.norm.* / lm_head.weight

  transformers divides ``attention.output`` and ``feed_forward.value`` by ``2 ** (i // rescale_every)`` in place
  while in eval mode (and the hidden states by 2 every ``rescale_every`` blocks, which the layer norms undo); the
  weights are read back at their trained scale. transformers' ``ln_out`` keeps LayerNorm's default epsilon (1e-5)
  whatever ``layer_norm_epsilon`` says; zoo uses ``layer_norm_epsilon`` for every norm, the same for the published
  RWKV-4 checkpoints (1e-5).

- BlinkDL's ``.pth`` checkpoints (the layout of the official weights and of the ``rwkv`` package; RWKV-4, RWKV-6
  arXiv:2404.05892, RWKV-7 arXiv:2503.14456), the version told by the keys (``att.r_k``: 7, ``att.time_maa_x``:
  6, ``att.time_mix_k``: 4)::

    emb.weight / blocks.0.ln0.* / ln_out.* / head.weight   <-> model.embed_tokens / model.pre_norm / model.norm
                                                             / lm_head
    blocks.{i}.ln1.* / ln2.*                    <-> model.layers.{i}.attn_norm.* / ffn_norm.*
    blocks.{i}.att.{receptance,key,value,gate,output}.weight <-> model.layers.{i}.attn.{r,k,v,g,o}_proj.weight
    blocks.{i}.att.{any other name}             <-> model.layers.{i}.attn.(the same name), vectors (1, 1, C) <-> (C,)
    blocks.{i}.ffn.*                            <-> model.layers.{i}.ffn.*

  RWKV-7 checkpoints may hold ``blocks.0.att.v0/v1/v2``, which the first layer does not use (its value is the
  residual the others mix in): they are dropped. The ``rwkv`` package folds ``ln0`` into the embedding when it
  loads a checkpoint (``emb = layer_norm(emb)``, exact: a layer norm per row of a lookup table); zoo keeps ``ln0``
  as ``model.pre_norm`` so that it stays trainable, and writes it back.

``python -m zoo.convert`` dispatches here: a transformers folder with ``model_type: rwkv``, a ``.pth`` file with
BlinkDL's keys, and a ``zoo_rwkv`` folder (to transformers for version 4, or to a ``.pth`` file when the
destination ends in ``.pth``).
"""

from __future__ import annotations

import re

import torch

from zoo.models.rwkv.configuration_rwkv import ZooRwkvConfig
from zoo.models.rwkv.modeling_rwkv import ZooRwkvForCausalLM

_HF_BLOCK = (
    ("attention.key.", "attn.k_proj."),
    ("attention.value.", "attn.v_proj."),
    ("attention.receptance.", "attn.r_proj."),
    ("attention.output.", "attn.o_proj."),
    ("attention.time_mix_key", "attn.time_mix_k"),
    ("attention.time_mix_value", "attn.time_mix_v"),
    ("attention.time_mix_receptance", "attn.time_mix_r"),
    ("attention.time_", "attn.time_"),
    ("feed_forward.time_mix_key", "ffn.time_mix_k"),
    ("feed_forward.time_mix_receptance", "ffn.time_mix_r"),
    ("feed_forward.", "ffn."),
    ("ln1.", "attn_norm."),
    ("ln2.", "ffn_norm."),
)
_BLINK_BLOCK = (
    ("att.receptance.", "attn.r_proj."),
    ("att.key.", "attn.k_proj."),
    ("att.value.", "attn.v_proj."),
    ("att.gate.", "attn.g_proj."),
    ("att.output.", "attn.o_proj."),
    ("att.", "attn."),
    ("ffn.", "ffn."),
    ("ln1.", "attn_norm."),
    ("ln2.", "ffn_norm."),
)
_BLINK_TOP = (
    ("emb.", "model.embed_tokens."),
    ("blocks.0.ln0.", "model.pre_norm."),
    ("ln_out.", "model.norm."),
    ("head.", "lm_head."),
)
_HF_TOP = (
    ("rwkv.embeddings.", "model.embed_tokens."),
    ("rwkv.blocks.0.pre_ln.", "model.pre_norm."),
    ("rwkv.ln_out.", "model.norm."),
    ("head.", "lm_head."),
)


_ZOO_BLOCK = "model.layers."


def _rename(key: str, top, block_prefix: str, block) -> str | None:
    """The zoo name of a checkpoint key (or, with the tables inverted, the checkpoint name of a zoo key)."""
    for old, new in top:
        if key.startswith(old):
            return new + key[len(old) :]
    match = re.match(rf"{re.escape(block_prefix)}(\d+)\.(.*)", key)
    if match is None:
        return None
    layer, rest = match.groups()
    for old, new in block:
        if rest.startswith(old):
            return f"{_ZOO_BLOCK}{layer}.{new}{rest[len(old) :]}"
    return None


def _load(model: ZooRwkvForCausalLM, renamed: dict[str, torch.Tensor]) -> ZooRwkvForCausalLM:
    """Copy ``renamed`` (zoo names) into ``model``, reshaping each tensor to the parameter's shape."""
    params = model.state_dict()
    unexpected = [k for k in renamed if k not in params]
    missing = [k for k in params if k not in renamed]
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, value in renamed.items():
            target = params[key]
            if value.numel() != target.numel():
                raise ValueError(f"{key}: {tuple(value.shape)} does not fit {tuple(target.shape)}")
            target.copy_(value.reshape(target.shape))
    return model


# -- transformers (RWKV-4) ---------------------------------------------------------------------------------------


def config_from_transformers(config) -> ZooRwkvConfig:
    if config.model_type != "rwkv":
        raise ValueError(
            f"expected a transformers RWKV config (model_type 'rwkv'), got {config.model_type!r}"
        )
    return ZooRwkvConfig(
        version=4,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        attention_hidden_size=config.attention_hidden_size,
        intermediate_size=config.intermediate_size,
        layer_norm_epsilon=config.layer_norm_epsilon,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=getattr(config, "pad_token_id", None),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def _hf_rescale(hf_model) -> dict[str, float]:
    """Factor by which each weight transformers rescaled in place must be multiplied to read it as trained."""
    config = hf_model.config
    if not (getattr(hf_model.rwkv, "layers_are_rescaled", False) and config.rescale_every > 0):
        return {}
    factors = {}
    for i in range(config.num_hidden_layers):
        scale = float(2 ** (i // config.rescale_every))
        factors[f"rwkv.blocks.{i}.attention.output.weight"] = scale
        factors[f"rwkv.blocks.{i}.feed_forward.value.weight"] = scale
    return factors


def from_transformers(hf_model) -> ZooRwkvForCausalLM:
    """A zoo RWKV-4 ``ZooRwkvForCausalLM`` holding the weights of a transformers ``RwkvForCausalLM``."""
    model = ZooRwkvForCausalLM(config_from_transformers(hf_model.config))
    factors = _hf_rescale(hf_model)
    renamed = {}
    for key, value in hf_model.state_dict().items():
        name = _rename(key, _HF_TOP, "rwkv.blocks.", _HF_BLOCK)
        if name is None:
            raise ValueError(f"unexpected transformers RWKV weight {key!r}")
        renamed[name] = value.float() * factors.get(key, 1.0)
    if model.config.tie_word_embeddings:
        renamed.pop("lm_head.weight", None)
    return _load(model, renamed).to(next(hf_model.parameters()).dtype)


def to_transformers(model: ZooRwkvForCausalLM):
    """A transformers ``RwkvForCausalLM`` holding the weights of a zoo RWKV-4."""
    from transformers import RwkvConfig, RwkvForCausalLM

    cfg = model.config
    if cfg.version != 4:
        raise ValueError(f"transformers has RWKV-4 only; this model has version={cfg.version}")
    hf = RwkvForCausalLM(
        RwkvConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            attention_hidden_size=cfg.attention_hidden_size,
            intermediate_size=cfg.intermediate_size,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
        )
    )
    hf.train()  # weights at their trained scale: transformers rescales them when it next runs in eval mode
    zoo_names = {}
    for key in hf.state_dict():
        zoo_names[_rename(key, _HF_TOP, "rwkv.blocks.", _HF_BLOCK)] = key
    ours = model.state_dict()
    with torch.no_grad():
        target = hf.state_dict()
        for name, key in zoo_names.items():
            if name not in ours:
                raise ValueError(f"{key!r} has no zoo counterpart {name!r}")
            target[key].copy_(ours[name].reshape(target[key].shape))
    return hf.eval().to(next(model.parameters()).dtype)


# -- BlinkDL .pth (RWKV-4, -6, -7) ------------------------------------------------------------------------------


def blink_version(state_dict: dict) -> int:
    """4, 6 or 7 from BlinkDL checkpoint keys; ``ValueError`` for anything else (RWKV-5 included)."""
    keys = set(state_dict)
    if "blocks.0.att.r_k" in keys or "blocks.0.att.x_r" in keys:
        return 7
    if "blocks.0.att.time_maa_x" in keys:
        return 6
    if "blocks.0.att.ln_x.weight" in keys:
        raise ValueError(
            "RWKV-5 checkpoints (att.ln_x without time_maa) are not supported; versions 4, 6, 7 are"
        )
    if "blocks.0.att.time_mix_k" in keys and "blocks.0.att.time_decay" in keys:
        return 4
    raise ValueError(f"not a BlinkDL RWKV checkpoint (keys such as {sorted(keys)[:3]})")


def is_blink_state_dict(state_dict: dict) -> bool:
    return isinstance(state_dict, dict) and "emb.weight" in state_dict and "blocks.0.ln1.weight" in state_dict


def config_from_blink(state_dict: dict, **overrides) -> ZooRwkvConfig:
    """The zoo config of a BlinkDL checkpoint, every size read from the weights' shapes."""
    version = blink_version(state_dict)
    vocab_size, C = state_dict["emb.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    fields = dict(
        version=version,
        vocab_size=vocab_size,
        hidden_size=C,
        num_hidden_layers=layers,
        attention_hidden_size=state_dict["blocks.0.att.key.weight"].shape[0],
        intermediate_size=state_dict["blocks.0.ffn.key.weight"].shape[0],
        tie_word_embeddings=False,
    )
    if version == 6:
        H, N = state_dict["blocks.0.att.time_faaaa"].shape[:2]
        fields.update(
            head_size=N,
            proj_low_rank_dim=state_dict["blocks.0.att.time_maa_w1"].shape[1] // 5,
            decay_low_rank_dim=state_dict["blocks.0.att.time_decay_w1"].shape[1],
        )
    elif version == 7:
        fields.update(
            head_size=state_dict["blocks.0.att.r_k"].shape[1],
            decay_low_rank_dim=state_dict["blocks.0.att.w1"].shape[1],
            a_low_rank_dim=state_dict["blocks.0.att.a1"].shape[1],
            gate_low_rank_dim=state_dict["blocks.0.att.g1"].shape[1],
        )
        if layers > 1:
            fields["v_low_rank_dim"] = state_dict["blocks.1.att.v1"].shape[1]
    return ZooRwkvConfig(**{**fields, **overrides})


def from_blink(state_dict: dict, **overrides) -> ZooRwkvForCausalLM:
    """A zoo ``ZooRwkvForCausalLM`` (float32) holding a BlinkDL checkpoint's weights; ``overrides`` go to the
    config (for example ``backend``)."""
    model = ZooRwkvForCausalLM(config_from_blink(state_dict, **overrides))
    renamed = {}
    for key, value in state_dict.items():
        if model.config.version == 7 and re.fullmatch(r"blocks\.0\.att\.v[012]", key):
            continue  # unused by the first layer
        name = _rename(key, _BLINK_TOP, "blocks.", _BLINK_BLOCK)
        if name is None:
            raise ValueError(f"unexpected BlinkDL RWKV weight {key!r}")
        renamed[name] = value.float()
    return _load(model, renamed)


# Vectors BlinkDL stores as (1, 1, n) (broadcast over batch and time); RWKV-4's decay and bonus are flat.
_FLAT_BLINK = re.compile(r"blocks\.\d+\.att\.time_(decay|first)$")


def to_blink(model: ZooRwkvForCausalLM) -> dict[str, torch.Tensor]:
    """The weights of a zoo RWKV in BlinkDL's layout (the inverse of :func:`from_blink`)."""
    version = model.config.version
    top = tuple((new, old) for old, new in _BLINK_TOP)
    block = tuple((new, old) for old, new in _BLINK_BLOCK)
    out = {}
    for name, value in model.state_dict().items():
        key = None
        for old, new in top:
            if name.startswith(old):
                key = new + name[len(old) :]
                break
        if key is None:
            layer, rest = re.match(r"model\.layers\.(\d+)\.(.*)", name).groups()
            for old, new in block:
                if rest.startswith(old):
                    key = f"blocks.{layer}.{new}{rest[len(old) :]}"
                    break
        value = value.detach().clone()
        mixing_vector = value.dim() == 1 and (".att." in key or ".ffn." in key)
        if mixing_vector and not key.endswith((".ln_x.weight", ".ln_x.bias")):
            if not (version == 4 and _FLAT_BLINK.search(key)):
                value = value.view(1, 1, -1)
        out[key] = value
    if model.config.tie_word_embeddings:
        out["head.weight"] = out["emb.weight"].clone()
    return out


def save_blink(model: ZooRwkvForCausalLM, path) -> None:
    """Write ``model`` as a BlinkDL ``.pth`` checkpoint (what the ``rwkv`` package loads)."""
    torch.save(to_blink(model), path)


__all__ = [
    "blink_version",
    "config_from_blink",
    "config_from_transformers",
    "from_blink",
    "from_transformers",
    "is_blink_state_dict",
    "save_blink",
    "to_blink",
    "to_transformers",
]
