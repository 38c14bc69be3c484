"""Configuration of the baseline transformer: Llama-style (Touvron et al., 2023, arXiv:2302.13971)."""

from __future__ import annotations

from typing import Literal

from transformers.modeling_rope_utils import RopeParameters

from zoo.models.utils import CACHE_NAME, ZooConfig, strict_config


@strict_config
class TransformerConfig(ZooConfig):
    r"""Decoder-only transformer: pre-norm, rotary positions, SwiGLU feed-forward, RMSNorm.

    Args:
        vocab_size: number of token ids; 259 fits the byte-level default tokenizer.
        hidden_size: width of the residual stream.
        intermediate_size: width of the feed-forward hidden layer.
        num_hidden_layers: number of blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention); ``None`` means as many as query heads.
        head_dim: width of a head; ``None`` means ``hidden_size // num_attention_heads``.
        hidden_act: activation of the feed-forward gate.
        mlp_type: ``"swiglu"`` (gated) or ``"mlp"`` (plain).
        norm_type: ``"rmsnorm"`` or ``"layernorm"``.
        rms_norm_eps: epsilon of the norms.
        max_position_embeddings: training context; a hard limit only for ``position_embedding_type="learned"``.
        position_embedding_type: ``"rope"``, ``"alibi"``, ``"learned"`` (absolute table) or ``"none"`` (NoPE).
        rope_parameters: transformers' RoPE dict (``rope_type`` default/linear/dynamic/yarn/longrope/llama3,
            ``rope_theta``, ``factor``, ...). ``rope_scaling`` is accepted as its older name.
        sliding_window: if set, each token attends to at most this many previous tokens.
        attention_bias: biases on the q/k/v/o projections.
        attention_dropout: dropout on attention weights while training.
        initializer_range: standard deviation of the normal initialisation.
        tie_word_embeddings: share the input embedding with the output projection.
    """

    model_type = "zoo_transformer"
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
    position_embedding_type: Literal["rope", "alibi", "learned", "none"] = "rope"
    rope_parameters: RopeParameters | dict | None = None
    sliding_window: int | None = None
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
            # checked here: once derived, head_dim can no longer tell whether it was given
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
        ):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        self._require(self.head_dim % 2 == 0, "head_dim", "must be even for rotary positions")
        self._require(
            self.sliding_window is None or self.sliding_window > 0, "sliding_window", "must be positive"
        )
        self._require(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")


__all__ = ["TransformerConfig"]
