"""Microsoft torchscale RetNet checkpoints to zoo and back, by renaming weights (the table is in
``modeling_retnet``'s docstring).

    python -m zoo.convert CHECKPOINT.pt OUT_DIR                      # reads the checkpoint's own configuration
    python -m zoo.convert CHECKPOINT.pt OUT_DIR --heads 2 --activation swish --value-dim 864
    python -m zoo.convert ZOO_RETNET_DIR OUT.pt                     # back to torchscale's layout

A checkpoint is a fairseq/torchscale file (the weights under ``model``, the configuration under ``cfg["model"]``
for fairseq's dataclass configs or ``args`` for older ones) or a bare ``RetNetDecoder`` state dict. What the
checkpoint's configuration says is used; options given on the command line must agree with it. A bare state dict
carries no configuration, so the options that cannot be read off the weights must be given: ``--heads``
(``decoder_retention_heads``) always, ``--activation`` (``activation_fn``; torchscale's own default is
``gelu``, fairseq's ``retnet_base`` uses ``swish``) and ``--scale-embedding`` when they differ from the
defaults below. The value width (``decoder_value_embed_dim``) is read off the weights; ``--value-dim`` or
``--value-factor`` are checked against them. The retention output gate is swish in every torchscale model.

torchscale options zoo does not implement (``deepnorm``, ``layernorm_embedding``, post-norm blocks, mixture of
experts, multiway) are refused with their name, never dropped.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from zoo.models.retnet.configuration_retnet import RetNetConfig
from zoo.models.retnet.modeling_retnet import RetNetForCausalLM

# torchscale name <-> zoo name; "{}" is the layer index
_NAMES = [
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    *(
        (f"layers.{{}}.retention.{p}_proj.weight", f"model.layers.{{}}.retention.{p}_proj.weight")
        for p in ("q", "k", "v", "g", "out")
    ),
    *(
        pair
        for w in ("weight", "bias")
        for pair in (
            (f"layers.{{}}.retention_layer_norm.{w}", f"model.layers.{{}}.retention_norm.{w}"),
            (f"layers.{{}}.final_layer_norm.{w}", f"model.layers.{{}}.mlp_norm.{w}"),
            (f"layer_norm.{w}", f"model.norm.{w}"),
        )
    ),
    ("layers.{}.ffn.fc1.weight", "model.layers.{}.mlp.gate_proj.weight"),  # the activated branch
    ("layers.{}.ffn.gate.weight", "model.layers.{}.mlp.up_proj.weight"),
    ("layers.{}.ffn.fc2.weight", "model.layers.{}.mlp.down_proj.weight"),
    ("output_projection.weight", "lm_head.weight"),
]


def _rename(key: str, forward: bool) -> str | None:
    for torchscale, zoo in _NAMES:
        source, target = (torchscale, zoo) if forward else (zoo, torchscale)
        match = re.fullmatch(re.escape(source).replace(r"\{\}", r"(\d+)"), key)
        if match:
            return target.format(*match.groups())
    return None


# Buffers and bookkeeping that carry no weights.
_IGNORED = re.compile(r"(^version$|\.version$|retnet_rel_pos)")

# torchscale's ``activation_fn`` names -> transformers' activation names (torchscale uses F.relu / F.gelu / F.silu)
ACTIVATIONS = {"swish": "silu", "gelu": "gelu", "relu": "relu"}
_ACTIVATION_NAMES = {v: k for k, v in ACTIVATIONS.items()} | {"swish": "swish"}

# torchscale options that change the computation in ways zoo's RetNet does not implement: name -> the value
# zoo's model computes
_UNSUPPORTED = {
    "deepnorm": False,
    "layernorm_embedding": False,
    "decoder_normalize_before": True,
    "multiway": False,
    "moe_freq": 0,
    "xpos_rel_pos": False,
    "no_output_layer": False,
}


def rename_torchscale_key(key: str) -> str:
    renamed = _rename(key.removeprefix("decoder."), forward=True)
    if renamed is None:
        raise ValueError(f"torchscale key {key!r} has no zoo counterpart")
    return renamed


def is_torchscale_state_dict(state_dict: dict) -> bool:
    """Whether ``state_dict`` looks like a torchscale RetNet decoder's (its retention projection names)."""
    return any(re.match(r"^(decoder\.)?layers\.\d+\.retention\.q_proj\.weight$", k) for k in state_dict)


def torchscale_to_zoo(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.removeprefix("decoder.").startswith("layernorm_embedding") for k in state_dict):
        raise ValueError(
            "the checkpoint has an embedding norm (layernorm_embedding), which zoo's RetNet lacks"
        )
    return {
        rename_torchscale_key(k): v
        for k, v in state_dict.items()
        if not _IGNORED.search(k.removeprefix("decoder."))
    }


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and the torchscale options (``{}`` when none are stored) of a checkpoint file."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(blob).__name__}, not a dict)")
    return blob.get("model", blob), checkpoint_options(blob)


def checkpoint_options(blob: dict) -> dict:
    """torchscale/fairseq options stored with a checkpoint: ``cfg["model"]`` (fairseq's dataclass configs) or
    ``args`` (older fairseq, an ``argparse.Namespace`` or a dict)."""
    cfg = blob.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return dict(cfg["model"])
    args = blob.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return dict(args)
    return {}


# the command-line flag that gives each torchscale option
_FLAGS = {
    "decoder_retention_heads": "--heads",
    "activation_fn": "--activation",
    "decoder_value_embed_dim": "--value-dim",
    "no_scale_embedding": "--scale-embedding",
}


def _merge(stored: dict, given: dict) -> dict:
    """Given options must agree with the stored ones; the result has both."""
    for name, value in given.items():
        if value is not None and stored.get(name) is not None and stored[name] != value:
            raise ValueError(
                f"{_FLAGS.get(name, name)} ({name}={value!r}) disagrees with the checkpoint's own "
                f"{name}={stored[name]!r}"
            )
    merged = {k: v for k, v in given.items() if v is not None}
    merged.update((k, v) for k, v in stored.items() if v is not None)
    return merged


def config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    num_heads: int | None = None,
    *,
    options: dict | None = None,
    activation: str | None = None,
    value_dim: int | None = None,
    value_factor: int | None = None,
    scale_embedding: bool | None = None,
    **overrides,
) -> RetNetConfig:
    """The zoo config of a torchscale state dict.

    ``options``: torchscale's own option names as a checkpoint stores them (``decoder_retention_heads``,
    ``activation_fn``, ``decoder_value_embed_dim``, ``layernorm_eps``, ``no_scale_embedding``, ...).
    ``num_heads``, ``activation`` (a torchscale name: swish / gelu / relu), ``value_dim``/``value_factor`` and
    ``scale_embedding`` say the same where the checkpoint does not, and must agree with it where it does.
    ``overrides``: zoo config fields set on top (``chunk_size``, ``position_encoding``, ...).
    """
    sd = torchscale_to_zoo(state_dict)
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    if value_factor is not None:
        if value_dim is not None and value_dim != value_factor * hidden:
            raise ValueError(
                f"--value-dim={value_dim} and --value-factor={value_factor} disagree ({hidden} wide)"
            )
        value_dim = value_factor * hidden
    opts = _merge(
        dict(options or {}),
        {
            "decoder_retention_heads": num_heads,
            "activation_fn": activation,
            "decoder_value_embed_dim": value_dim,
            "no_scale_embedding": None if scale_embedding is None else not scale_embedding,
        },
    )
    for name, computed in _UNSUPPORTED.items():
        if name in opts and opts[name] != computed:
            raise ValueError(
                f"the checkpoint sets {name}={opts[name]!r}, which zoo's RetNet does not implement"
            )
    if "decoder_retention_heads" not in opts:
        raise ValueError("the checkpoint stores no configuration: give --heads (decoder_retention_heads)")
    act = opts.get("activation_fn", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"activation_fn={act!r} is not a torchscale activation ({', '.join(ACTIVATIONS)})")

    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    ffn = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    weights_value_dim = sd["model.layers.0.retention.v_proj.weight"].shape[0]
    expected = {
        "decoder_embed_dim": hidden,
        "decoder_value_embed_dim": weights_value_dim,
        "decoder_ffn_embed_dim": ffn,
        "decoder_layers": layers,
    }
    for name, found in expected.items():
        if name in opts and opts[name] != found:
            raise ValueError(f"{name}={opts[name]} (the options) but the weights have {found}")
    if opts.get("vocab_size", -1) not in (-1, vocab):
        raise ValueError(f"vocab_size={opts['vocab_size']} (the options) but the embedding has {vocab} rows")
    norm = "layernorm" if "model.layers.0.retention_norm.bias" in sd else "rmsnorm"
    eps = float(opts.get("layernorm_eps", 1e-6))
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=int(opts["decoder_retention_heads"]),
        value_dim=weights_value_dim,
        hidden_act=ACTIVATIONS[act],
        retention_gate_act="silu",
        norm_type=norm,
        rms_norm_eps=eps,
        group_norm_eps=eps,
        scale_embedding=not opts.get("no_scale_embedding", True),
        tie_word_embeddings="lm_head.weight" not in sd,
    )
    if "max_target_positions" in opts:
        kwargs["max_position_embeddings"] = int(opts["max_target_positions"])
    kwargs.update(overrides)
    if hidden % kwargs["num_attention_heads"] or weights_value_dim % kwargs["num_attention_heads"]:
        raise ValueError(
            f"{kwargs['num_attention_heads']} heads divide neither the width {hidden} nor the value width "
            f"{weights_value_dim} of the weights"
        )
    return RetNetConfig(**kwargs)


def from_torchscale(
    state_dict: dict[str, torch.Tensor], num_heads: int | None = None, **options
) -> RetNetForCausalLM:
    """A ``RetNetForCausalLM`` with a torchscale state dict's weights (options: :func:`config_from_state_dict`)."""
    model = RetNetForCausalLM(config_from_state_dict(state_dict, num_heads, **options))
    missing, unexpected = model.load_state_dict(torchscale_to_zoo(state_dict), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return model


def to_torchscale(model: RetNetForCausalLM) -> dict:
    """A fairseq-style checkpoint of a zoo RetNet: ``{"model": decoder state dict, "cfg": {"model": options}}``.

    Refuses what torchscale's ``RetNetDecoder`` cannot express (a retention gate other than swish, data-dependent
    decay, xPos, LayerNorm blocks, other decays, no normalisation)."""
    config = model.config
    problems = {
        "retention_gate_act": config.retention_gate_act in ("silu", "swish"),
        "decay": config.decay == "fixed" and config.decay_gammas is None,
        "position_encoding": config.position_encoding == "rotary" and config.rope_theta == 10000.0,
        "norm_type": config.norm_type == "rmsnorm",
        "normalize": config.normalize,
        "rms_norm_eps": config.rms_norm_eps == config.group_norm_eps,
        "hidden_act": config.hidden_act in _ACTIVATION_NAMES,
    }
    bad = [name for name, ok in problems.items() if not ok]
    if bad:
        raise ValueError(
            f"torchscale's RetNetDecoder cannot express this model's {', '.join(bad)} "
            f"({', '.join(f'{n}={getattr(config, n)!r}' for n in bad)})"
        )
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = _rename(key, forward=False)
        if name is None:
            raise ValueError(f"zoo weight {key!r} has no torchscale counterpart")
        state["decoder." + name] = value.detach().clone()
    options = {
        "decoder_embed_dim": config.hidden_size,
        "decoder_value_embed_dim": config.value_dim,
        "decoder_ffn_embed_dim": config.intermediate_size,
        "decoder_layers": config.num_hidden_layers,
        "decoder_retention_heads": config.num_attention_heads,
        "activation_fn": _ACTIVATION_NAMES[config.hidden_act],
        "layernorm_eps": config.rms_norm_eps,
        "no_scale_embedding": not config.scale_embedding,
        "share_decoder_input_output_embed": bool(config.tie_word_embeddings),
        "max_target_positions": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "decoder_normalize_before": True,
        "deepnorm": False,
        "layernorm_embedding": False,
    }
    return {"model": state, "cfg": {"model": options}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The torchscale options of ``python -m zoo.convert`` (and of this module's own command line)."""
    group = parser.add_argument_group(
        "torchscale RetNet checkpoints (when the checkpoint does not store them)"
    )
    group.add_argument("--heads", type=int, help="decoder_retention_heads")
    group.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        help="activation_fn of the feed-forward (torchscale: gelu)",
    )
    group.add_argument("--value-dim", type=int, help="decoder_value_embed_dim (checked against the weights)")
    group.add_argument("--value-factor", type=int, help="value width as a multiple of the model width")
    group.add_argument(
        "--scale-embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embeddings times sqrt(width) (torchscale no_scale_embedding=False); torchscale's default: no",
    )


def options_from_arguments(args: argparse.Namespace) -> dict:
    return {
        "num_heads": args.heads,
        "activation": args.activation,
        "value_dim": args.value_dim,
        "value_factor": args.value_factor,
        "scale_embedding": args.scale_embedding,
    }


def convert_file(src, dst, **options) -> RetNetForCausalLM:
    """A torchscale checkpoint file ``src`` to a zoo folder ``dst`` (``options``: :func:`config_from_state_dict`);
    nothing is written when the checkpoint and the options disagree."""
    state_dict, stored = load_checkpoint(src)
    if not is_torchscale_state_dict(state_dict):
        raise ValueError(f"{src}: keys are not a torchscale RetNet's (e.g. {next(iter(state_dict), None)!r})")
    model = from_torchscale(state_dict, options=stored, **options)
    model.save_pretrained(dst)
    return model


def save_torchscale(model: RetNetForCausalLM, path) -> None:
    """Write ``model`` as a torchscale/fairseq checkpoint file (atomically: a temporary file, then renamed)."""
    path = Path(path)
    blob = to_torchscale(model)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        convert_file(args.checkpoint, args.out_dir, **options_from_arguments(args))
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
