"""Context extension of RoPE models by rescaling the rotary frequencies.

Methods (all computed by transformers' ``ROPE_INIT_FUNCTIONS`` except the static NTK-aware form, which is a change
of base):

- ``linear``: position interpolation (Chen et al., 2023, arXiv:2306.15595): every position divided by the factor;
  positions inside the original window move too.
- ``ntk``: NTK-aware scaling (bloc97, 2023): base ``theta * factor ** (d / (d - 2))``; the highest frequencies
  (short-range positions) are nearly unchanged.
- ``dynamic``: dynamic NTK (Rozière et al., 2023 / Emozilla): NTK scaling whose factor grows with the current
  length, exact inside the original window.
- ``yarn``: YaRN (Peng et al., 2023, arXiv:2309.00071): interpolate low frequencies, keep high ones, temperature.
- ``longrope``: LongRoPE (Ding et al., 2024, arXiv:2402.13753): per-dimension factors, ``short_factor`` inside the
  original window and ``long_factor`` past it. Without searched factors, a YaRN-like ramp from 1 (high
  frequencies) to ``factor`` (low frequencies) is used for ``long_factor``.
- ``llama3``: Llama 3.1's band-wise scaling (Dubey et al., 2024).
"""

from __future__ import annotations

import math

from torch import nn

from zoo.modules.rotary import RotaryEmbedding

METHODS = ("linear", "ntk", "dynamic", "yarn", "longrope", "llama3")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters_for(config, method: str, factor: float, **kw) -> dict:
    """The ``rope_parameters`` dict that extends ``config``'s context by ``factor`` with ``method``."""
    if method not in METHODS:
        raise ValueError(f"RoPE scaling method {method!r} is not one of {METHODS}")
    if not factor or factor < 1.0:
        raise ValueError(f"RoPE scaling factor={factor!r} must be >= 1")
    base = dict(config.rope_parameters or {})
    theta = base.get("rope_theta", 10000.0)
    original = base.get("original_max_position_embeddings", config.max_position_embeddings)
    if method == "ntk":
        dim = _head_dim(config)
        return {"rope_type": "default", "rope_theta": theta * factor ** (dim / (dim - 2)), **kw}
    params = {"rope_type": method, "rope_theta": theta, "factor": float(factor)}
    if method in ("yarn", "longrope", "llama3"):
        params["original_max_position_embeddings"] = original
    if method == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if method == "longrope":
        half = _head_dim(config) // 2
        params["short_factor"] = [1.0] * half
        params["long_factor"] = _ramp_factors(theta, half, original, factor)
    params.update(kw)
    return params


def _ramp_factors(theta: float, half: int, original: int, factor: float) -> list[float]:
    """Per-dimension factors: 1 where a wavelength fits many times in the window, ``factor`` where it does not."""
    out = []
    for i in range(half):
        wavelength = 2 * math.pi * theta ** (2 * i / (2 * half))
        turns = original / wavelength
        # Linear in log(turns) between 32 turns (keep) and 1 turn (interpolate), as YaRN's beta_fast/beta_slow.
        t = min(max((math.log(32) - math.log(max(turns, 1e-9))) / math.log(32), 0.0), 1.0)
        out.append(1.0 + t * (factor - 1.0))
    return out


def rotary_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RotaryEmbedding)]


def extend_context(
    model: nn.Module, method: str, factor: float, *, max_position_embeddings: int | None = None, **kw
) -> nn.Module:
    """Rescale every rotary embedding of ``model`` in place and record it in ``model.config``.

    ``max_position_embeddings`` (default: ``factor`` times the original) becomes the model's new nominal context;
    the original one is kept as ``original_max_position_embeddings`` (``dynamic`` leaves it unchanged, since it
    scales by the ratio of the current length to it). Saving the model afterwards stores the
    scaling, so ``from_pretrained`` restores it. Equivalent to loading with
    ``from_pretrained(path, rope_parameters=rope_parameters_for(config, method, factor))``.
    """
    config = model.config
    if not hasattr(config, "rope_parameters") or getattr(config, "position_embedding_type", "rope") != "rope":
        raise ValueError(
            f"{type(model).__name__} does not use rotary positions (position_embedding_type="
            f"{getattr(config, 'position_embedding_type', None)!r}); RoPE scaling does not apply"
        )
    modules = rotary_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no RotaryEmbedding module to rescale")
    params = rope_parameters_for(config, method, factor, **kw)
    config.rope_parameters = params
    original = config.max_position_embeddings
    if method == "dynamic":
        # Dynamic NTK measures its growth against max_position_embeddings, which must stay the original window.
        max_position_embeddings = original
    elif max_position_embeddings is None:
        max_position_embeddings = int(round(original * factor))
    for name, old in modules:
        new = RotaryEmbedding(config, head_dim=old.config.head_dim).to(old.inv_freq.device)
        new.original_max_seq_len = params.get("original_max_position_embeddings", original)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    config.max_position_embeddings = max_position_embeddings
    return model
