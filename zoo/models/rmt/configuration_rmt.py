"""Configuration of the Recurrent Memory Transformer (Bulatov et al., 2022, arXiv:2207.06881; scaled in
arXiv:2304.11062): memory tokens and segment recurrence over any causal language model."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from zoo.models.utils import CACHE_NAME, ZooConfig, strict_config


@strict_config
class RMTConfig(ZooConfig):
    r"""A causal LM (the backbone) that reads a long input segment by segment, carrying learned memory tokens.

    Each segment is fed to the backbone as ``[memory, segment tokens, memory]``, the layout of the authors' code
    (``booydar/recurrent-memory-transformer``): the memory is read at the start of the segment (every token
    attends to it) and written at its end, where the same memory tokens, placed after the segment, attend to it;
    their last hidden states (after the backbone's final norm) are the memory of the next segment.

    Args:
        backbone: the backbone's config, any zoo or transformers causal LM, nested as a sub-config the way
            ``EncoderDecoderConfig`` nests its encoder and decoder (a dict with ``model_type`` is rebuilt through
            ``AutoConfig.for_model``); the default is a zoo baseline transformer.
        num_mem_tokens: memory tokens per segment (0: plain segment-wise processing, nothing carried over).
        segment_length: tokens per segment, not counting the memory tokens.
        segment_alignment: how a sequence is cut into segments, as in the authors' code: ``"left"`` (full segments
            from the first token on, the last one shorter; the only one a decoding cache can extend),
            ``"right"`` (the first one shorter) or ``"center"`` (equal segments). Left and right are counted
            from each row's own first or last real token, so that padding never moves a segment boundary.
        bptt_depth: segments through which gradients flow back along the memory: the memory written by a
            segment more than ``bptt_depth`` segments before the last one is detached. ``None``: through all.
        memory_source: what the write tokens hand on as the next memory. ``"output"`` (the authors'): their last
            hidden states, after the backbone's final norm. ``"residual"``: the residual stream entering the final
            norm, i.e. the memory read plus what every layer added to it, so the memory is carried on by an
            identity path and a segment that adds nothing keeps it whole (for pre-norm backbones whose final norm
            is ``norm``, ``ln_f``, ``final_layer_norm`` or ``norm_f`` on the base model).
        memory_update: how the next memory is made from the one read and what the write tokens hand on
            (``memory_source``). ``"replace"`` (the authors'): what they hand on is the next memory. ``"gated"``: a
            learned gate per memory token and channel, ``g = sigmoid(W h + b)`` from what they hand on (h), mixes
            the two, ``m + g * (h - m)``; a segment with nothing to write can close its gates and keep the memory
            as it is, and with ``memory_source="output"`` the memory stays within the final norm's scale however
            many segments pass.
        memory_gate_bias: the gates' initial bias (``memory_update="gated"``): ``sigmoid(memory_gate_bias)`` is the
            share of the memory each segment rewrites at the start of training. A negative bias (-3: 5%) keeps the
            memory by default, like an LSTM's forget-gate bias, and training opens the gates where there is
            something to write.
        vocab_size: if set, overrides the backbone's own (the trainer sets it from the tokenizer); read back
            from the backbone otherwise.
        tie_word_embeddings: if set, overrides the backbone's own setting.
        use_cache: decode with a cache by default (memory and the open segment's backbone cache).
    """

    model_type = "zoo_rmt"
    keys_to_ignore_at_inference = [CACHE_NAME, "memory_state"]
    sub_configs = {"backbone": AutoConfig}
    sub_configs_defaults = {"backbone": SubConfigSpec(config_class=AutoConfig, model_type="zoo_transformer")}

    backbone: PretrainedConfig | dict | None = None
    num_mem_tokens: int = 10
    segment_length: int = 512
    segment_alignment: Literal["left", "right", "center"] = "left"
    bptt_depth: int | None = None
    memory_source: Literal["output", "residual"] = "output"
    memory_update: Literal["replace", "gated"] = "replace"
    memory_gate_bias: float = 0.0
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.backbone, dict) and "model_type" in self.backbone:
            # rebuilt here rather than by the sub-config spec, so that a zoo backbone's unknown fields are errors
            backbone = dict(self.backbone)
            self.backbone = AutoConfig.for_model(backbone.pop("model_type"), **backbone)
        super().__post_init__(**kwargs)

    def derive_fields(self) -> None:
        if isinstance(self.backbone, PretrainedConfig):
            self._sync_backbone()

    def _sync_backbone(self) -> None:
        backbone = self.backbone
        if self.tie_word_embeddings is not None:
            backbone.tie_word_embeddings = self.tie_word_embeddings
        if self.vocab_size is not None:
            backbone.vocab_size = self.vocab_size
        self.vocab_size = backbone.vocab_size
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(backbone, name, None))

    def validate_fields(self) -> None:
        self._require(self.num_mem_tokens >= 0, "num_mem_tokens", "must be >= 0")
        self._require(self.segment_length >= 1, "segment_length", "must be >= 1")
        self._require(self.bptt_depth is None or self.bptt_depth >= 1, "bptt_depth", "must be >= 1 or None")

    @property
    def hidden_size(self) -> int:
        config = self.backbone
        return getattr(config, "hidden_size", None) or config.n_embd

    def get_text_config(self, *args, **kwargs):
        return self


__all__ = ["RMTConfig"]
