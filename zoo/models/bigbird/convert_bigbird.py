"""Conversion between transformers' ``BigBirdForMaskedLM`` / ``BigBirdForSequenceClassification`` /
``BigBirdForQuestionAnswering`` and zoo's BigBird, by renaming (BigBird: Zaheer et al. 2020, arXiv:2007.14062):

    transformers                                          zoo
    bert.embeddings.word_embeddings                   <-> model.embed_tokens
    bert.embeddings.position_embeddings               <-> model.embed_positions
    bert.embeddings.token_type_embeddings             <-> model.embed_token_types
    bert.embeddings.LayerNorm                         <-> model.embed_norm
    bert.encoder.layer.{i}.attention.self.{query, key, value}
                                                      <-> model.layers.{i}.self_attn.{q, k, v}_proj
    bert.encoder.layer.{i}.attention.output.dense     <-> model.layers.{i}.self_attn.o_proj
    bert.encoder.layer.{i}.attention.output.LayerNorm <-> model.layers.{i}.attn_norm
    bert.encoder.layer.{i}.intermediate.dense         <-> model.layers.{i}.up_proj
    bert.encoder.layer.{i}.output.dense               <-> model.layers.{i}.down_proj
    bert.encoder.layer.{i}.output.LayerNorm           <-> model.layers.{i}.mlp_norm
    cls.predictions.transform.{dense, LayerNorm}      <-> lm_head.{dense, norm}
    cls.predictions.decoder, cls.predictions.bias     <-> lm_head.decoder
    classifier.{dense, out_proj}                      <-> {dense, score}
    qa_classifier.intermediate.dense                  <-> qa_head.up_proj
    qa_classifier.output.{dense, LayerNorm}           <-> qa_head.{down_proj, norm}
    qa_classifier.qa_outputs                          <-> qa_head.qa_outputs

``bert.pooler`` (the next-sentence pooler, which no head uses) is dropped; converting back gives transformers'
freshly initialised one where the class has it (the masked LM and sequence classification; the question-answering
model is built without it). The converted config sets ``transformers_compat=True``, so that the zoo model computes
what transformers' computes in eval mode (see ``ZooBigBirdConfig``); set it to False to use zoo's seeded plan.

Each head converts to its counterpart, both ways: ``BigBirdForMaskedLM`` <-> ``ZooBigBirdForMaskedLM``,
``BigBirdForSequenceClassification`` <-> ``ZooBigBirdForSequenceClassification`` (``num_labels`` and the label
names carried over), ``BigBirdForQuestionAnswering`` <-> ``ZooBigBirdForQuestionAnswering``. The question-answering
models agree on their input convention through the shared ``sep_token_id``: without ``question_lengths``, a row's
question runs up to and including its first ``sep_token_id``; its logits are taken out of the competition (all but
the first token's) and, without ``token_type_ids``, the question is type 0 and the context type 1. Both have two
outputs (start, end): transformers' class sets ``num_labels = 2`` itself.

``python -m zoo.convert BIGBIRD_DIR OUT_DIR`` dispatches here for ``model_type: big_bird`` (the class named by the
folder's ``architectures``, :class:`TransformersBigBird`), and ``python -m zoo.convert ZOO_DIR OUT_DIR`` for
``zoo_bigbird`` (the head named by the folder's ``architectures``, by default the masked LM).
"""

from __future__ import annotations

import re

from zoo.models.bigbird.configuration_bigbird import ZooBigBirdConfig
from zoo.models.bigbird.modeling_bigbird import (
    ZooBigBirdForMaskedLM,
    ZooBigBirdForQuestionAnswering,
    ZooBigBirdForSequenceClassification,
)
from zoo.models.utils import class_named_in

# transformers class -> the zoo class its weights convert to (anything else: the masked LM)
_HEADS = {
    "BigBirdForSequenceClassification": ZooBigBirdForSequenceClassification,
    "BigBirdForQuestionAnswering": ZooBigBirdForQuestionAnswering,
}
# zoo class -> the transformers class it converts back to
_BACK = {
    ZooBigBirdForMaskedLM: "BigBirdForMaskedLM",
    ZooBigBirdForSequenceClassification: "BigBirdForSequenceClassification",
    ZooBigBirdForQuestionAnswering: "BigBirdForQuestionAnswering",
}
# label fields a classification head keeps in its config (question answering: transformers fixes num_labels = 2)
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
    "attention_type",
    "block_size",
    "num_random_blocks",
    "use_bias",
    "rescale_embeddings",
    "classifier_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "tie_word_embeddings",
)

_LAYER = r"bert\.encoder\.layer\.(\d+)\."
# (transformers pattern, zoo replacement); applied to the part of a key before ".weight" / ".bias"
RENAMES = (
    (r"bert\.embeddings\.word_embeddings", "model.embed_tokens"),
    (r"bert\.embeddings\.position_embeddings", "model.embed_positions"),
    (r"bert\.embeddings\.token_type_embeddings", "model.embed_token_types"),
    (r"bert\.embeddings\.LayerNorm", "model.embed_norm"),
    (_LAYER + r"attention\.self\.query", r"model.layers.\1.self_attn.q_proj"),
    (_LAYER + r"attention\.self\.key", r"model.layers.\1.self_attn.k_proj"),
    (_LAYER + r"attention\.self\.value", r"model.layers.\1.self_attn.v_proj"),
    (_LAYER + r"attention\.output\.dense", r"model.layers.\1.self_attn.o_proj"),
    (_LAYER + r"attention\.output\.LayerNorm", r"model.layers.\1.attn_norm"),
    (_LAYER + r"intermediate\.dense", r"model.layers.\1.up_proj"),
    (_LAYER + r"output\.dense", r"model.layers.\1.down_proj"),
    (_LAYER + r"output\.LayerNorm", r"model.layers.\1.mlp_norm"),
    (r"cls\.predictions\.transform\.dense", "lm_head.dense"),
    (r"cls\.predictions\.transform\.LayerNorm", "lm_head.norm"),
    (r"cls\.predictions\.decoder", "lm_head.decoder"),
    (r"classifier\.dense", "dense"),
    (r"classifier\.out_proj", "score"),
    (r"qa_classifier\.intermediate\.dense", "qa_head.up_proj"),
    (r"qa_classifier\.output\.dense", "qa_head.down_proj"),
    (r"qa_classifier\.output\.LayerNorm", "qa_head.norm"),
    (r"qa_classifier\.qa_outputs", "qa_head.qa_outputs"),
)
_DROPPED = re.compile(r"bert\.pooler\..*")


def _to_zoo_name(name: str) -> str | None:
    if name == "cls.predictions.bias":  # the decoder's bias, kept twice by transformers
        return "lm_head.decoder.bias"
    module, _, leaf = name.rpartition(".")
    for pattern, replacement in RENAMES:
        if re.fullmatch(pattern, module):
            return re.sub(pattern, replacement, module) + "." + leaf
    return None


class TransformersBigBird:
    """Loads a transformers BigBird folder as the class its ``architectures`` names when zoo has that head
    (``BigBirdForQuestionAnswering``, ``BigBirdForSequenceClassification``), else as ``BigBirdForMaskedLM`` (what
    ``python -m zoo.convert`` converts from)."""

    @staticmethod
    def from_pretrained(src, **kwargs):
        import transformers

        name = class_named_in(src, {name: name for name in _HEADS}, "BigBirdForMaskedLM")
        return getattr(transformers, name).from_pretrained(src, **kwargs)


def config_from_transformers(hf_config) -> ZooBigBirdConfig:
    """The ``ZooBigBirdConfig`` of a transformers ``BigBirdConfig`` (encoder, ``transformers_compat=True``)."""
    if hf_config.is_decoder or hf_config.add_cross_attention:
        raise ValueError("a BigBird decoder (is_decoder / add_cross_attention) has no zoo counterpart")
    fields = {name: getattr(hf_config, name) for name in _SHARED_FIELDS}
    labels = {name: getattr(hf_config, name) for name in _LABEL_FIELDS}
    return ZooBigBirdConfig(**fields, **labels, transformers_compat=True)


def from_transformers(hf_model):
    """A zoo BigBird holding the weights of a transformers ``BigBirdForMaskedLM`` (-> ``ZooBigBirdForMaskedLM``),
    ``BigBirdForSequenceClassification`` (-> ``ZooBigBirdForSequenceClassification``) or
    ``BigBirdForQuestionAnswering`` (-> ``ZooBigBirdForQuestionAnswering``)."""
    config = config_from_transformers(hf_model.config)
    model = _HEADS.get(type(hf_model).__name__, ZooBigBirdForMaskedLM)(config)
    state, unknown = {}, []
    for name, tensor in hf_model.state_dict().items():
        if _DROPPED.fullmatch(name):
            continue
        new = _to_zoo_name(name)
        if new is None:
            unknown.append(name)
        else:
            state[new] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.decoder.weight" and config.tie_word_embeddings)]
    if unknown or missing or unexpected:
        raise ValueError(f"weights do not map: unknown {unknown}, missing {missing}, unexpected {unexpected}")
    return model.to(next(hf_model.parameters()).dtype)


def to_transformers(model):
    """The transformers counterpart of a zoo BigBird encoder of transformers' layout (3-block window, one global
    block at each end), holding its weights: ``BigBirdForMaskedLM``, ``BigBirdForSequenceClassification`` or
    ``BigBirdForQuestionAnswering``, by the zoo model's class."""
    import transformers

    config = model.config
    if type(model) not in _BACK:
        raise ValueError(
            f"{type(model).__name__} has no transformers counterpart to convert to (expected one of "
            f"{sorted(cls.__name__ for cls in _BACK)})"
        )
    if config.causal or config.window_blocks != 3 or config.global_blocks != 1:
        raise ValueError(
            "only a bidirectional zoo_bigbird with window_blocks=3 and global_blocks=1 has a transformers "
            f"counterpart (causal={config.causal}, window_blocks={config.window_blocks}, "
            f"global_blocks={config.global_blocks})"
        )
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    labels = {name: getattr(config, name) for name in _LABEL_FIELDS}
    if isinstance(model, ZooBigBirdForQuestionAnswering) and config.num_labels != 2:
        labels = {"num_labels": 2}  # start and end (transformers' class sets it too)
    hf = getattr(transformers, _BACK[type(model)])(transformers.BigBirdConfig(**fields, **labels))
    ours = model.state_dict()
    renamed = {}
    for hf_name, tensor in hf.state_dict().items():
        zoo_name = _to_zoo_name(hf_name)
        if zoo_name is None and _DROPPED.fullmatch(hf_name):
            renamed[hf_name] = tensor
            continue
        if zoo_name is None or zoo_name not in ours:
            raise ValueError(f"no zoo weight for transformers' {hf_name}")
        renamed[hf_name] = ours[zoo_name]
    hf.load_state_dict(renamed)
    return hf.to(next(model.parameters()).dtype)


def load_zoo(src):
    """Loads a ``zoo_bigbird`` folder as the head its ``architectures`` names when it converts back
    (``ZooBigBirdForQuestionAnswering``, ``ZooBigBirdForSequenceClassification``), else as
    ``ZooBigBirdForMaskedLM`` (what ``python -m zoo.convert`` converts back from)."""
    return class_named_in(src, {cls.__name__: cls for cls in _BACK}, ZooBigBirdForMaskedLM).from_pretrained(src)
