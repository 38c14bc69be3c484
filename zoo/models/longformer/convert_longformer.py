"""Conversion between transformers' ``Longformer*`` encoder classes and zoo's, both ways, by renaming (Longformer:
Beltagy et al. 2020, arXiv:2004.05150):

    transformers                                              zoo
    longformer.embeddings.word_embeddings                 <-> model.embed_tokens
    longformer.embeddings.position_embeddings             <-> model.embed_positions
    longformer.embeddings.token_type_embeddings           <-> model.embed_token_types
    longformer.embeddings.LayerNorm                       <-> model.embed_norm
    longformer.encoder.layer.{i}.attention.self.{query, key, value}
                                                          <-> model.layers.{i}.self_attn.{q, k, v}_proj
    longformer.encoder.layer.{i}.attention.self.{query, key, value}_global
                                                          <-> model.layers.{i}.self_attn.{q, k, v}_global_proj
    longformer.encoder.layer.{i}.attention.output.dense   <-> model.layers.{i}.self_attn.o_proj
    longformer.encoder.layer.{i}.attention.output.LayerNorm <-> model.layers.{i}.attn_norm
    longformer.encoder.layer.{i}.intermediate.dense       <-> model.layers.{i}.up_proj
    longformer.encoder.layer.{i}.output.dense             <-> model.layers.{i}.down_proj
    longformer.encoder.layer.{i}.output.LayerNorm         <-> model.layers.{i}.mlp_norm
    lm_head.{dense, layer_norm, decoder}, lm_head.bias    <-> lm_head.{dense, norm, decoder}, lm_head.decoder.bias
    classifier.{dense, out_proj} (sequence classification) <-> {dense, score}
    classifier (token classification)                     <-> score
    qa_outputs                                            <-> qa_outputs

Each head converts to its counterpart, both ways: ``LongformerForMaskedLM``, ``LongformerForSequenceClassification``
and ``LongformerForTokenClassification`` (``num_labels`` and the label names carried over),
``LongformerForQuestionAnswering`` (two outputs, start and end; the question, the tokens before the first
``sep_token_id``, gets global attention by default in both) <-> ``ZooLongformerFor*`` of the same name.

``python -m zoo.convert LONGFORMER_DIR OUT_DIR`` dispatches here for ``model_type: longformer`` (the class named by
the folder's ``architectures``, :class:`TransformersLongformer`), and back for ``zoo_longformer`` (the head named by
the folder's ``architectures``, by default the masked LM).
"""

from __future__ import annotations

import re

from zoo.models.longformer.configuration_longformer import ZooLongformerConfig
from zoo.models.longformer.modeling_longformer import (
    ZooLongformerForMaskedLM,
    ZooLongformerForQuestionAnswering,
    ZooLongformerForSequenceClassification,
    ZooLongformerForTokenClassification,
)
from zoo.models.utils import class_named_in

# transformers class <-> zoo class, both ways
_HEADS = {
    "LongformerForMaskedLM": ZooLongformerForMaskedLM,
    "LongformerForSequenceClassification": ZooLongformerForSequenceClassification,
    "LongformerForTokenClassification": ZooLongformerForTokenClassification,
    "LongformerForQuestionAnswering": ZooLongformerForQuestionAnswering,
}
_BACK = {cls: name for name, cls in _HEADS.items()}
# label fields a classification head keeps in its config
_LABEL_FIELDS = ("id2label", "label2id", "problem_type")

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "attention_window",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "tie_word_embeddings",
)

_LAYER = r"longformer\.encoder\.layer\.(\d+)\."
# (transformers pattern, zoo replacement); applied to the part of a key before ".weight" / ".bias"
RENAMES = (
    (r"longformer\.embeddings\.word_embeddings", "model.embed_tokens"),
    (r"longformer\.embeddings\.position_embeddings", "model.embed_positions"),
    (r"longformer\.embeddings\.token_type_embeddings", "model.embed_token_types"),
    (r"longformer\.embeddings\.LayerNorm", "model.embed_norm"),
    (_LAYER + r"attention\.self\.query", r"model.layers.\1.self_attn.q_proj"),
    (_LAYER + r"attention\.self\.key", r"model.layers.\1.self_attn.k_proj"),
    (_LAYER + r"attention\.self\.value", r"model.layers.\1.self_attn.v_proj"),
    (_LAYER + r"attention\.self\.query_global", r"model.layers.\1.self_attn.q_global_proj"),
    (_LAYER + r"attention\.self\.key_global", r"model.layers.\1.self_attn.k_global_proj"),
    (_LAYER + r"attention\.self\.value_global", r"model.layers.\1.self_attn.v_global_proj"),
    (_LAYER + r"attention\.output\.dense", r"model.layers.\1.self_attn.o_proj"),
    (_LAYER + r"attention\.output\.LayerNorm", r"model.layers.\1.attn_norm"),
    (_LAYER + r"intermediate\.dense", r"model.layers.\1.up_proj"),
    (_LAYER + r"output\.dense", r"model.layers.\1.down_proj"),
    (_LAYER + r"output\.LayerNorm", r"model.layers.\1.mlp_norm"),
    (r"lm_head\.dense", "lm_head.dense"),
    (r"lm_head\.layer_norm", "lm_head.norm"),
    (r"lm_head\.decoder", "lm_head.decoder"),
    (r"classifier\.dense", "dense"),
    (r"classifier\.out_proj", "score"),
    (r"classifier", "score"),
    (r"qa_outputs", "qa_outputs"),
)


def _to_zoo_name(name: str) -> str | None:
    module, _, leaf = name.rpartition(".")
    if (
        name == "lm_head.bias"
    ):  # transformers keeps the decoder's bias twice (lm_head.bias is lm_head.decoder.bias)
        return "lm_head.decoder.bias"
    for pattern, replacement in RENAMES:
        if re.fullmatch(pattern, module):
            return re.sub(pattern, replacement, module) + "." + leaf
    return None


class TransformersLongformer:
    """Loads a transformers Longformer folder as the class its ``architectures`` names when zoo has that head
    (``LongformerForSequenceClassification``, ``LongformerForTokenClassification``,
    ``LongformerForQuestionAnswering``), else as ``LongformerForMaskedLM`` (what ``python -m zoo.convert`` converts
    from)."""

    @staticmethod
    def from_pretrained(src, **kwargs):
        import transformers

        name = class_named_in(src, {name: name for name in _HEADS}, "LongformerForMaskedLM")
        return getattr(transformers, name).from_pretrained(src, **kwargs)


def load_zoo(src):
    """Loads a ``zoo_longformer`` folder as the head its ``architectures`` names, else as
    ``ZooLongformerForMaskedLM`` (what ``python -m zoo.convert`` converts back from)."""
    return class_named_in(src, {cls.__name__: cls for cls in _BACK}, ZooLongformerForMaskedLM).from_pretrained(src)


def config_from_transformers(hf_config) -> ZooLongformerConfig:
    """The ``ZooLongformerConfig`` of a transformers ``LongformerConfig``."""
    fields = {name: getattr(hf_config, name) for name in _SHARED_FIELDS}
    window = fields["attention_window"]
    fields["attention_window"] = (
        [window] * hf_config.num_hidden_layers if isinstance(window, int) else list(window)
    )
    labels = {name: getattr(hf_config, name) for name in _LABEL_FIELDS}
    return ZooLongformerConfig(**fields, **labels)


def from_transformers(hf_model):
    """A zoo Longformer holding the weights of a transformers ``LongformerForMaskedLM``,
    ``LongformerForSequenceClassification``, ``LongformerForTokenClassification`` or
    ``LongformerForQuestionAnswering`` (the ``ZooLongformerFor*`` head of the same name)."""
    name = type(hf_model).__name__
    if name not in _HEADS:
        raise ValueError(f"{name} has no zoo counterpart (expected one of {sorted(_HEADS)})")
    if name == "LongformerForQuestionAnswering" and hf_model.config.num_labels != 2:
        raise ValueError(
            f"LongformerForQuestionAnswering with num_labels={hf_model.config.num_labels}: question answering "
            "has two outputs (start, end), num_labels=2"
        )
    model = _HEADS[name](config_from_transformers(hf_model.config))
    state, unknown = {}, []
    for name, tensor in hf_model.state_dict().items():
        new = _to_zoo_name(name)
        if new is None:
            unknown.append(name)
        else:
            state[new] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.decoder.weight" and model.config.tie_word_embeddings)]
    if unknown or missing or unexpected:
        raise ValueError(f"weights do not map: unknown {unknown}, missing {missing}, unexpected {unexpected}")
    return model.to(next(hf_model.parameters()).dtype)


def to_transformers(model):
    """The transformers counterpart of a bidirectional zoo Longformer (``LongformerForMaskedLM``,
    ``LongformerForSequenceClassification``, ``LongformerForTokenClassification`` or
    ``LongformerForQuestionAnswering``, by the zoo model's class), holding its weights."""
    import transformers

    if model.config.causal:
        raise ValueError(
            "a causal zoo_longformer has no transformers counterpart (transformers' Longformer attends both ways)"
        )
    if type(model) not in _BACK:
        raise ValueError(
            f"{type(model).__name__} has no transformers counterpart to convert to (expected one of "
            f"{sorted(cls.__name__ for cls in _BACK)})"
        )
    fields = {name: getattr(model.config, name) for name in _SHARED_FIELDS}
    labels = {name: getattr(model.config, name) for name in _LABEL_FIELDS}
    if isinstance(model, ZooLongformerForQuestionAnswering) and model.config.num_labels != 2:
        # transformers' QA head has num_labels outputs and splits them into start and end
        labels = {"num_labels": 2}
    hf = getattr(transformers, _BACK[type(model)])(transformers.LongformerConfig(**fields, **labels))
    ours = model.state_dict()
    renamed = {}
    for hf_name in hf.state_dict():
        zoo_name = _to_zoo_name(hf_name)
        if zoo_name is None or zoo_name not in ours:
            raise ValueError(f"no zoo weight for transformers' {hf_name}")
        renamed[hf_name] = ours[zoo_name]
    hf.load_state_dict(renamed)
    return hf.to(next(model.parameters()).dtype)
