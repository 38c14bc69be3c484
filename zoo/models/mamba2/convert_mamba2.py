"""Conversion between transformers' ``Mamba2ForCausalLM`` and zoo's Mamba-2, both ways, by renaming (the same
table as Mamba's, ``zoo.models.mamba.convert_mamba``; the mixer's own names, ``in_proj``, ``conv1d``, ``dt_bias``,
``A_log``, ``D``, ``norm``, ``out_proj``, are identical). ``python -m zoo.convert`` dispatches here for
``model_type: mamba2``.

transformers' ``chunk_size`` is not carried over: it tunes transformers' kernels (256 by default), and zoo's
config leaves the chunk length to each backend (``chunk_size=None``). Converting back writes zoo's ``chunk_size``
when one is set, transformers' default otherwise.
"""

from __future__ import annotations

from zoo.models.mamba.convert_mamba import RENAMES, load_renamed
from zoo.models.mamba2.configuration_mamba2 import ZooMamba2Config
from zoo.models.mamba2.modeling_mamba2 import Mamba2ForCausalLM

_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_heads",
    "head_dim",
    "state_size",
    "num_hidden_layers",
    "n_groups",
    "expand",
    "conv_kernel",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
    "time_step_limit",
    "time_step_rank",
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


def config_from_transformers(config) -> ZooMamba2Config:
    if config.model_type != "mamba2":
        raise ValueError(
            f"expected a transformers Mamba-2 config (model_type 'mamba2'), got {config.model_type!r}"
        )
    return ZooMamba2Config(**{name: getattr(config, name) for name in _SHARED_FIELDS})


def from_transformers(hf_model) -> Mamba2ForCausalLM:
    """A zoo ``Mamba2ForCausalLM`` holding the weights of a transformers ``Mamba2ForCausalLM``."""
    model = Mamba2ForCausalLM(config_from_transformers(hf_model.config))
    load_renamed(model, hf_model.state_dict(), RENAMES)
    return model.to(next(hf_model.parameters()).dtype)


def to_transformers(model: Mamba2ForCausalLM):
    """A transformers ``Mamba2ForCausalLM`` holding the weights of a zoo Mamba-2."""
    from transformers import Mamba2Config
    from transformers import Mamba2ForCausalLM as HFMamba2ForCausalLM

    fields = {n: getattr(model.config, n) for n in _SHARED_FIELDS}
    if model.config.chunk_size is not None:
        fields["chunk_size"] = model.config.chunk_size
    hf = HFMamba2ForCausalLM(Mamba2Config(**fields))
    load_renamed(hf, model.state_dict(), tuple((new, old) for old, new in RENAMES))
    return hf.to(next(model.parameters()).dtype)
