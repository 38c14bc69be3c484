"""Configuration of RetNet, the Retentive Network (Sun et al., 2023, arXiv:2307.08621)."""

from __future__ import annotations

from typing import Literal

from zoo.models.utils import CACHE_NAME, ZooConfig, strict_config


@strict_config
class RetNetConfig(ZooConfig):
    r"""Decoder of multi-scale retention blocks and SwiGLU feed-forwards.

    Args:
        vocab_size: number of token ids; 259 fits the byte-level default tokenizer.
        hidden_size: width of the residual stream (torchscale ``decoder_embed_dim``).
        intermediate_size: width of the feed-forward hidden layer (``decoder_ffn_embed_dim``).
        num_hidden_layers: number of blocks.
        num_attention_heads: retention heads (``decoder_retention_heads``).
        value_dim: width of the values and of the output gate, all heads together (torchscale
            ``decoder_value_embed_dim``: 1280 for 768 in its default config, 864 for 512 in fairseq's
            ``retnet_base``); ``None`` derives it from ``value_factor``.
        value_factor: a convenience for ``value_dim = value_factor * hidden_size`` (the paper uses 2); ``None``
            with ``value_dim`` set. Derived from ``value_dim`` when that is a multiple of ``hidden_size``.
        decay: ``"fixed"``: one decay per head, gamma_h = 1 - 2^(-5 - h) (or ``decay_gammas``);
            ``"data_dependent"``: per-token, per-head gates ``logsigmoid(decay_proj(x)) / gate_logit_normalizer``
            as in gated linear attention.
        decay_gammas: explicit per-head gammas for ``decay="fixed"``; ``None`` gives the paper's.
        gate_logit_normalizer: temperature of the data-dependent gates.
        retention_mode: ``"parallel"`` (dense decay mask), ``"chunk"`` (chunkwise, O(T) memory; the default) or
            ``"recurrent"`` (token by token); all three give the same outputs.
        chunk_size: tokens per chunk in ``"chunk"`` mode.
        position_encoding: ``"rotary"`` (torchscale's interleaved rotation), ``"xpos"`` (rotation with the xPos
            scale, Sun et al., 2022) or ``"none"``.
        rope_theta: base of the rotation frequencies.
        xpos_scale_base: length scale of the xPos decay.
        norm_type: ``"rmsnorm"`` or ``"layernorm"`` for the block norms.
        rms_norm_eps: epsilon of the block norms.
        group_norm_eps: epsilon of the per-head RMS group norm.
        normalize: apply the paper's scale-invariant normalisations (decay-mask rows scaled by the inverse square
            root of their sum; scores divided by max(|row sum|, 1)). Only for ``decay="fixed"``.
        hidden_act: activation of the feed-forward gate (torchscale ``activation_fn``: ``"gelu"`` in its
            default config, ``"swish"`` in fairseq's ``retnet_base``).
        retention_gate_act: activation of the retention output gate (torchscale's ``gate_fn``, always swish).
        scale_embedding: multiply embeddings by sqrt(hidden_size) (torchscale ``no_scale_embedding=False``).
        backend: op backend for ``"chunk"`` mode (``naive``/``torch``/``triton``); ``None`` chooses by device.
        initializer_range: standard deviation for embeddings and the feed-forward.
        tie_word_embeddings: share the input embedding with the output projection.
    """

    model_type = "zoo_retnet"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    value_dim: int | None = None
    value_factor: int | None = None
    decay: Literal["fixed", "data_dependent"] = "fixed"
    decay_gammas: list | None = None
    gate_logit_normalizer: float = 16.0
    retention_mode: Literal["parallel", "chunk", "recurrent"] = "chunk"
    chunk_size: int = 64
    position_encoding: Literal["rotary", "xpos", "none"] = "rotary"
    rope_theta: float = 10000.0
    xpos_scale_base: float = 512.0
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    rms_norm_eps: float = 1e-6
    group_norm_eps: float = 1e-6
    normalize: bool = True
    hidden_act: str = "silu"
    retention_gate_act: str = "silu"
    scale_embedding: bool = False
    backend: str | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        """Width of a query/key head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def value_head_dim(self) -> int:
        return self.value_dim // self.num_attention_heads

    def derive_fields(self) -> None:
        if self.value_factor is not None:
            self._require(self.value_factor > 0, "value_factor", "must be positive")
        if self.value_dim is None:
            self.value_dim = self.hidden_size * (2 if self.value_factor is None else self.value_factor)
        elif self.value_factor is not None and self.value_dim != self.value_factor * self.hidden_size:
            raise ValueError(
                f"RetNetConfig: value_dim={self.value_dim} and value_factor={self.value_factor} disagree "
                f"(value_factor * hidden_size = {self.value_factor * self.hidden_size}); give one of them"
            )
        if self.value_factor is None and self.value_dim % self.hidden_size == 0:
            self.value_factor = self.value_dim // self.hidden_size

    def validate_fields(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "value_dim",
            "chunk_size",
        ):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(
            self.value_dim % self.num_attention_heads == 0,
            "value_dim",
            f"must be a multiple of num_attention_heads={self.num_attention_heads}",
        )
        self._require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size={self.hidden_size}",
        )
        self._require(
            self.head_dim % 2 == 0, "hidden_size", "/ num_attention_heads must be even (rotation pairs)"
        )
        if self.decay_gammas is not None:
            self._require(
                len(self.decay_gammas) == self.num_attention_heads,
                "decay_gammas",
                f"must list one gamma per head ({self.num_attention_heads})",
            )
            self._require(all(0.0 < g < 1.0 for g in self.decay_gammas), "decay_gammas", "must lie in (0, 1)")
        self._require(
            self.backend in (None, "naive", "torch", "triton"),
            "backend",
            "must be one of None, 'naive', 'torch', 'triton'",
        )
        self._require(self.gate_logit_normalizer > 0, "gate_logit_normalizer", "must be positive")

    def gammas(self) -> list[float]:
        if self.decay_gammas is not None:
            return [float(g) for g in self.decay_gammas]
        return [1.0 - 2.0 ** (-5 - h) for h in range(self.num_attention_heads)]


__all__ = ["RetNetConfig"]
