"""Conversion between transformers' ``MambaForCausalLM`` (and ``FalconMambaForCausalLM``) and zoo's Mamba, both
ways, by renaming:

    transformers                                   zoo
    backbone.embeddings.weight                 <-> model.embed_tokens.weight
    backbone.layers.{i}.norm.weight            <-> model.layers.{i}.norm.weight
    backbone.layers.{i}.mixer.{A_log, D, conv1d.*, in_proj.*, x_proj.*, dt_proj.*, out_proj.*}
                                               <-> model.layers.{i}.mixer.(the same)
    backbone.norm_f.weight                     <-> model.norm.weight
    lm_head.weight                             <-> lm_head.weight

FalconMamba (Zuo et al., 2024, arXiv:2410.05355) is Mamba with weightless RMS norms on the time step, B and C
inside the mixer: zoo's Mamba with ``mixer_rms_norm=True`` (the same weight names; the norms have none), and it
converts back to ``FalconMambaForCausalLM``.

``python -m zoo.convert MAMBA_DIR OUT_DIR`` dispatches here for ``model_type: mamba`` and ``falcon_mamba``.
"""

from __future__ import annotations

from zoo.models.mamba.configuration_mamba import ZooMambaConfig
from zoo.models.mamba.modeling_mamba import MambaForCausalLM

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "state_size",
    "num_hidden_layers",
    "expand",
    "conv_kernel",
    "time_step_rank",
    "time_step_scale",
    "time_step_min",
    "time_step_max",
    "time_step_init_scheme",
    "time_step_floor",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "layer_norm_epsilon",
    "residual_in_fp32",
    "rescale_prenorm_residual",
    "initializer_range",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# transformers prefix -> zoo prefix, the first that matches (Mamba-2 shares the table)
RENAMES = (
    ("backbone.embeddings.", "model.embed_tokens."),
    ("backbone.norm_f.", "model.norm."),
    ("backbone.", "model."),
)


def load_renamed(model, state_dict: dict, pairs):
    """Load ``state_dict`` into ``model`` with each key's prefix renamed by the first matching ``(old, new)``."""
    renamed = {}
    for key, value in state_dict.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return model


def config_from_transformers(config) -> ZooMambaConfig:
    if config.model_type not in ("mamba", "falcon_mamba"):
        raise ValueError(
            "expected a transformers Mamba or FalconMamba config (model_type 'mamba' or 'falcon_mamba'), "
            f"got {config.model_type!r}"
        )
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    if config.model_type == "falcon_mamba":
        fields.update(mixer_rms_norm=True, mixer_rms_eps=config.mixer_rms_eps)
    return ZooMambaConfig(**fields)


def from_transformers(hf_model) -> MambaForCausalLM:
    """A zoo ``MambaForCausalLM`` holding the weights of a transformers ``MambaForCausalLM`` or
    ``FalconMambaForCausalLM``."""
    model = MambaForCausalLM(config_from_transformers(hf_model.config))
    load_renamed(model, hf_model.state_dict(), RENAMES)
    return model.to(next(hf_model.parameters()).dtype)


def to_transformers(model: MambaForCausalLM):
    """A transformers ``MambaForCausalLM`` holding the weights of a zoo Mamba (``FalconMambaForCausalLM`` for one
    with ``mixer_rms_norm``)."""
    import transformers

    fields = {n: getattr(model.config, n) for n in _SHARED_FIELDS}
    if model.config.mixer_rms_norm:
        config = transformers.FalconMambaConfig(**fields, mixer_rms_eps=model.config.mixer_rms_eps)
        hf = transformers.FalconMambaForCausalLM(config)
    else:
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(**fields))
    # "model." last so that the embedding and final-norm names are matched first
    load_renamed(hf, model.state_dict(), tuple((new, old) for old, new in RENAMES))
    return hf.to(next(model.parameters()).dtype)
