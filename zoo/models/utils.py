"""What every zoo model shares beyond layers: config validation and input checks.

``ZooConfig`` is the base of every zoo ``PretrainedConfig``. It turns the silent acceptance of unknown keyword
arguments (transformers keeps them as attributes) into a ``ValueError`` that names the field and suggests the
closest known one, and checks the declared type of every field.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing

import torch
from transformers import PretrainedConfig
from transformers.generation import GenerationConfig

# Keyword arguments that PretrainedConfig itself consumes or that saved configs carry.
_GENERIC_KWARGS = {
    "torch_dtype",
    "num_labels",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
    "name_or_path",
    "output_attentions",
    "attn_implementation",
    "experts_implementation",
    "per_layer_config",
    "model_type",
    "use_return_dict",
    "auto_map",
    "custom_pipelines",
    "layer_types",
}


def _type_ok(value, annotation) -> bool:
    if annotation is typing.Any or isinstance(annotation, str):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin is not None:
        return isinstance(value, origin)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.is_typeddict(annotation):
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _own_type_hints(cls) -> dict:
    """Annotations declared by zoo config classes (not transformers' base), evaluated in their modules."""
    hints: dict = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, ZooConfig)):
            continue
        namespace = vars(sys.modules[klass.__module__])
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, namespace)  # noqa: S307 - our own annotations
                except Exception:
                    continue
            hints[name] = annotation
    return hints


class ZooConfig(PretrainedConfig):
    """Base configuration: strict about unknown fields and field types; subclasses add ``validate_fields``."""

    def __post_init__(self, **kwargs):
        own = {f.name: f for f in dataclasses.fields(self)}
        generation = set(GenerationConfig._get_default_generation_params())
        for key in kwargs:
            if key in _GENERIC_KWARGS or key in generation or key.startswith("_"):
                continue
            close = difflib.get_close_matches(key, list(own), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{type(self).__name__}: unknown field {key!r}{hint}")
        hints = _own_type_hints(type(self))
        for name in own:
            if name in hints and not _type_ok(getattr(self, name), hints[name]):
                raise ValueError(
                    f"{type(self).__name__}: field {name!r} expects {hints[name]}, got {getattr(self, name)!r}"
                )
        self.derive_fields()
        self.validate_fields()
        super().__post_init__(**kwargs)

    def derive_fields(self) -> None:
        """Compute derived sizes once (for example ``head_dim`` from ``hidden_size``), after type checks."""

    def validate_fields(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""

    def _require(self, condition: bool, field: str, message: str) -> None:
        if not condition:
            raise ValueError(f"{type(self).__name__}: {field}={getattr(self, field)!r} {message}")


def check_input_ids(input_ids: torch.Tensor | None, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the offending id when a token is outside ``[0, vocab_size)``."""
    # Skipped under torch.compile: reading the values back would break the graph.
    if input_ids is None or input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")


def embed_inputs(model, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """Exactly one of ``input_ids`` (checked against the vocabulary) or ``inputs_embeds``; returns embeddings."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is None:
        return inputs_embeds
    check_input_ids(input_ids, model.config.vocab_size)
    return model.embed_tokens(input_ids)


def resolve_use_cache(model, use_cache: bool | None) -> bool:
    """Cache by default at inference only, never while training with gradient checkpointing."""
    if model.gradient_checkpointing and model.training:
        return False
    return use_cache if use_cache is not None else bool(model.config.use_cache and not model.training)


def default_position_ids(
    attention_mask: torch.Tensor | None, past_len: int, batch_size: int, seq_len: int, device
) -> torch.LongTensor:
    """Positions of the current tokens: counting real tokens when a padding mask is given (so left padding does
    not shift them), else ``past_len .. past_len + seq_len - 1``."""
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
    return torch.arange(past_len, past_len + seq_len, device=device)[None].expand(batch_size, seq_len)
