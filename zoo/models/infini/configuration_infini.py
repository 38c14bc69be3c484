"""Configuration of Infini-attention (Munkhdalai et al., 2024, "Leave No Context Behind: Efficient Infinite Context
Transformers with Infini-attention", arXiv:2404.07143)."""

from __future__ import annotations

from typing import Literal

from transformers.modeling_rope_utils import RopeParameters

from zoo.models.utils import CACHE_NAME, ZooConfig, strict_config


@strict_config
class InfiniConfig(ZooConfig):
    r"""Llama-style decoder whose attention runs per segment, with a compressive memory across segments.

    Args:
        vocab_size: number of token ids; 259 fits the byte-level default tokenizer.
        hidden_size: width of the residual stream.
        intermediate_size: width of the feed-forward hidden layer.
        num_hidden_layers: number of blocks.
        num_attention_heads: query heads; each has its own memory and gate.
        num_key_value_heads: key/value heads (grouped-query attention); ``None`` means as many as query heads. A
            key/value head's keys and values are written into the memory of each query head it serves.
        head_dim: width of a head; ``None`` means ``hidden_size // num_attention_heads``.
        hidden_act: activation of the feed-forward gate.
        mlp_type: ``"swiglu"`` (gated) or ``"mlp"`` (plain).
        norm_type: ``"rmsnorm"`` or ``"layernorm"``.
        rms_norm_eps: epsilon of the norms.
        max_position_embeddings: the longest segment the rotary scaling types are told about (positions restart
            in every segment, so only ``segment_length`` positions are ever used).
        position_embedding_type: ``"rope"`` (rotary, within each segment) or ``"none"``.
        rope_parameters: transformers' RoPE dict (``rope_type``, ``rope_theta``, ...).
        segment_length: tokens per segment: dot-product attention stays inside a segment; the memory is written
            after each one. Memory and compute per token are bounded by it, whatever the input length.
        memory_update: ``"linear"`` (M += σ(K)ᵀ V) or ``"delta"`` (M += σ(K)ᵀ (V - retrieved)).
        memory_eps: added to the memory read's denominator σ(Q) z (zero before the first write).
        gate_init: initial value of the per-head gate β; the output mixes sigmoid(β) of the memory read with
            1 - sigmoid(β) of local attention (0: half each; very negative: local attention only).
        attention_bias: biases on the q/k/v/o projections.
        attention_dropout: dropout on attention weights while training.
        initializer_range: standard deviation of the normal initialisation.
        tie_word_embeddings: share the input embedding with the output projection.
    """

    model_type = "zoo_infini"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    mlp_type: Literal["swiglu", "mlp"] = "swiglu"
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    position_embedding_type: Literal["rope", "none"] = "rope"
    rope_parameters: RopeParameters | dict | None = None
    segment_length: int = 2048
    memory_update: Literal["linear", "delta"] = "delta"
    memory_eps: float = 1e-6
    gate_init: int | float = 0.0
    attention_bias: bool = False
    attention_dropout: int | float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False

    def derive_fields(self) -> None:
        if self.head_dim is None:
            self._require(
                self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"must be positive and divide hidden_size={self.hidden_size} (or set head_dim)",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    def validate_fields(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "segment_length",
        ):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        self._require(self.head_dim % 2 == 0, "head_dim", "must be even for rotary positions")
        self._require(
            self.memory_eps > 0, "memory_eps", "must be positive (it guards the division where z = 0)"
        )
        self._require(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")


__all__ = ["InfiniConfig"]
