"""What every zoo model shares beyond layers: config validation, the forward's keywords, input handling.

``ZooConfig`` is the base of every zoo ``PretrainedConfig``. It turns the silent acceptance of unknown keyword
arguments (transformers keeps them as attributes) into a ``ValueError`` that names the field and suggests the
closest known one; the declared type of every field is checked by huggingface_hub's strict dataclass validation
(:func:`strict_config`, the ``@strict`` transformers' own configs use).

``model_forward`` wraps every zoo ``forward``: the cache arrives under whichever name transformers uses
(``cache`` from 5.24 on, ``past_key_values`` before; both are accepted), an unknown keyword is a ``TypeError``
naming it, and outputs carry the cache under the installed transformers' field name (``CACHE_NAME``).
``backbone_inputs`` is the input handling every backbone shares: embeddings, the cache, position ids, padding
and packed-document boundaries.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import sys
import typing
from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict, type_validator
from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig
from transformers.generation import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

from zoo.modules.cache import RecurrentCache
from zoo.modules.documents import document_starts

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


def _resolve_annotations(cls) -> None:
    """Evaluate string field annotations (``from __future__ import annotations``) in the module that declared
    them, in place: huggingface_hub's type validators skip a field whose type is a string."""
    for f in dataclasses.fields(cls):
        if not isinstance(f.type, str):
            continue
        owner = next((k for k in cls.__mro__ if f.name in vars(k).get("__annotations__", {})), None)
        if owner is None:
            continue
        try:
            f.type = eval(f.type, vars(sys.modules[owner.__module__]))  # noqa: S307 - our own annotations
        except Exception:
            continue


def _field_error(cls, err: Exception) -> ValueError:
    cause = err.__cause__ or err
    return ValueError(f"{cls.__name__}: {cause}")


def strict_config(cls):
    """Class decorator: huggingface_hub's ``@strict`` for a zoo config, as transformers' configs use it.

    The declared type of every field is checked on construction and on every later assignment, and the
    ``validate_*`` methods (``validate_fields`` and transformers' own) run after ``__init__``. Its errors are
    raised as ``ValueError`` naming the field, like every other bad value of a zoo config.
    """
    _resolve_annotations(cls)
    cls = strict(cls)
    checked_setattr, checked_init = cls.__setattr__, cls.__init__

    def __setattr__(self, name, value):
        try:
            checked_setattr(self, name, value)
        except StrictDataclassError as err:
            raise _field_error(type(self), err) from None

    @functools.wraps(checked_init)
    def __init__(self, *args, **kwargs):
        try:
            checked_init(self, *args, **kwargs)
        except StrictDataclassError as err:
            raise _field_error(type(self), err) from None

    cls.__setattr__, cls.__init__ = __setattr__, __init__
    cls.__zoo_strict__ = cls
    return cls


class ZooConfig(PretrainedConfig):
    """Base configuration: strict about unknown fields and field types; subclasses add ``validate_fields``.

    Subclasses are decorated with :func:`strict_config` (huggingface_hub's ``@strict``), which checks field types
    on construction and assignment; an undecorated subclass has its field types checked once, at construction,
    by the same validators.
    """

    def __post_init__(self, **kwargs):
        own = {f.name: f for f in dataclasses.fields(self)}
        generation = set(GenerationConfig._get_default_generation_params())
        for key in kwargs:
            if key in _GENERIC_KWARGS or key in generation or key.startswith("_"):
                continue
            close = difflib.get_close_matches(key, list(own), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{type(self).__name__}: unknown field {key!r}{hint}")
        if getattr(type(self), "__zoo_strict__", None) is not type(self):
            # a config not (yet) decorated with @strict_config: its field types checked once, by the same
            # huggingface_hub validators
            _resolve_annotations(type(self))
            for f in dataclasses.fields(self):
                try:
                    type_validator(f.name, getattr(self, f.name), f.type)
                except TypeError as err:
                    raise _field_error(type(self), err) from None
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


# The output field (and generate()'s keyword) that holds the cache: transformers 5.24 renamed
# ``past_key_values`` / ``cache_params`` to ``cache``.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_CACHE_ALIASES = ("past_key_values", "cache_params")


def model_forward(forward: Callable) -> Callable:
    """Decorator for every zoo ``forward``, whose own signature names the cache ``cache`` and has no ``**kwargs``.

    - ``past_key_values`` / ``cache_params`` (transformers before 5.24, and user code) are taken as ``cache``;
    - ``return_dict=False`` returns a tuple; ``output_attentions=True`` is refused (no zoo mixer returns
      attention weights);
    - any other keyword the forward does not declare is a ``TypeError`` naming it, with the closest known name,
      instead of being dropped: a renamed argument upstream must fail loudly.
    """
    params = inspect.signature(forward).parameters
    known = [n for n in params if n != "self"]

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        aliases = [name for name in _CACHE_ALIASES if name in kwargs]
        if aliases:
            if len(aliases) > 1 or "cache" in kwargs:
                raise TypeError(
                    f"{type(self).__name__}.forward: pass the cache once, got {aliases + ['cache']}"
                )
            kwargs["cache"] = kwargs.pop(aliases[0])
        return_dict = kwargs.pop("return_dict", None)
        if kwargs.pop("output_attentions", None):
            raise ValueError(
                f"{type(self).__name__} does not return attention weights (output_attentions=True)"
            )
        unknown = [name for name in kwargs if name not in params]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{type(self).__name__}.forward got an unexpected keyword argument {unknown[0]!r}{hint}"
            )
        out = forward(self, *args, **kwargs)
        return out.to_tuple() if return_dict is False else out

    return wrapper


def output_cache(outputs):
    """The cache a model output carries, under the installed transformers' field name."""
    return getattr(outputs, CACHE_NAME)


def with_cache(output_class, cache, **fields):
    """``output_class(**fields)`` with ``cache`` under the installed transformers' field name."""
    return output_class(**fields, **{CACHE_NAME: cache})


@dataclasses.dataclass
class BackboneInputs:
    """What a backbone's layers need from its inputs, prepared once by :func:`backbone_inputs`.

    ``embeds`` (B, T, C); ``cache`` the cache to read and update, or None; ``past_len`` tokens it holds;
    ``position_ids`` (B, T) positions of the current tokens (within each document when packed); ``pad_mask``
    the 2D attention mask over past and current tokens when some token is padding (always under torch.compile,
    which cannot branch on data), else None; ``doc_starts`` (B, T) True where a packed document starts, given
    only when the caller passed ``position_ids`` to an empty cache and T > 1, else None.
    """

    embeds: torch.Tensor
    cache: typing.Any
    past_len: int
    position_ids: torch.LongTensor
    pad_mask: torch.Tensor | None
    doc_starts: torch.BoolTensor | None

    @property
    def packed(self) -> bool:
        """Whether a row holds more than one document (a data-dependent read: a graph break under compile)."""
        return self.doc_starts is not None and bool(self.doc_starts[:, 1:].any())


def backbone_inputs(
    model,
    *,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache,
    use_cache: bool | None,
    new_cache: Callable[[], typing.Any],
    cache_class: type | tuple[type, ...] | None = None,
) -> BackboneInputs:
    """The input handling every zoo backbone shares.

    Exactly one of ``input_ids`` (checked against the vocabulary) or ``inputs_embeds``. A given ``cache`` is read
    and updated (it must be a ``cache_class``); with ``use_cache`` (default: at inference) and none given,
    ``new_cache()`` makes one. Packed documents are recognised by ``position_ids`` that restart at 0, on an empty
    cache, whether or not a cache is kept: with the cache on (the default at inference) documents must not mix
    any more than without it. Without ``position_ids``, positions count real tokens, so left padding does not
    shift them.
    """
    embeds = embed_inputs(model, input_ids, inputs_embeds)
    B, T, _ = embeds.shape
    if cache is not None and cache_class is not None and not isinstance(cache, cache_class):
        names = " or ".join(
            c.__name__ for c in (cache_class if isinstance(cache_class, tuple) else (cache_class,))
        )
        raise ValueError(f"{type(model).__name__}: the cache must be a {names}, got {type(cache).__name__}")
    if cache is None and resolve_use_cache(model, use_cache):
        cache = new_cache()
    past_len = cache.get_seq_length() if cache is not None else 0
    doc_starts = None
    if position_ids is not None and past_len == 0 and T > 1:
        doc_starts = document_starts(position_ids)
    if position_ids is None:
        position_ids = default_position_ids(attention_mask, past_len, B, T, embeds.device)
    pad_mask = None
    if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
        pad_mask = attention_mask
    return BackboneInputs(embeds, cache, past_len, position_ids, pad_mask, doc_starts)


class ZooBackbone:
    """What every zoo backbone (``XModel``) shares: the embedding accessors and the whole of ``forward`` but the
    layers. Listed before the ``PreTrainedModel`` base: ``class XModel(ZooBackbone, XPreTrainedModel)``.

    A backbone has ``embed_tokens``, sets ``cache_class`` and defines ``new_cache()`` (the empty cache for
    decoding) and ``layers_forward(inputs, output_hidden_states)``, its architecture: from the prepared
    :class:`BackboneInputs` to ``(last_hidden_state, all hidden states or None)``, updating ``inputs.cache``.
    """

    cache_class: type | tuple[type, ...] | None = None

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_cache(self):
        raise NotImplementedError(f"{type(self).__name__} must define new_cache()")

    def layers_forward(self, inputs: BackboneInputs, output_hidden_states: bool):
        raise NotImplementedError(f"{type(self).__name__} must define layers_forward()")

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPast:
        inputs = backbone_inputs(
            self,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            new_cache=self.new_cache,
            cache_class=self.cache_class,
        )
        hidden_states, all_hidden = self.layers_forward(inputs, bool(output_hidden_states))
        if isinstance(inputs.cache, RecurrentCache):
            inputs.cache.advance(hidden_states.shape[1])
        return with_cache(
            BaseModelOutputWithPast, inputs.cache, last_hidden_state=hidden_states, hidden_states=all_hidden
        )


def class_named_in(src, classes: dict, default):
    """The value of ``classes`` (keyed by class name) for the first class the saved config at ``src`` names in its
    ``architectures``, else ``default``: which head a converter loads a folder as."""
    from transformers import AutoConfig

    names = AutoConfig.from_pretrained(src).architectures or ()
    return next((classes[name] for name in names if name in classes), default)
