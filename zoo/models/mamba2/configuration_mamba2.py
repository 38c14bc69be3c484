"""Configuration of Mamba-2 (Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", arXiv:2405.21060), field for field as transformers' ``Mamba2Config`` so
that its checkpoints convert by renaming."""

from __future__ import annotations

import math

from zoo.models.utils import CACHE_NAME, ZooConfig


class ZooMamba2Config(ZooConfig):
    r"""(Named apart from transformers' ``Mamba2Config``: the Auto classes key configs by class name.)

    A stack of Mamba-2 blocks ``x + mixer(norm(x))``; the mixer's state-space scan has one scalar decay per head
    and token (the state-space dual form), which zoo runs on ``zoo.ops.retention``.

    Args:
        vocab_size, hidden_size, num_hidden_layers: as usual.
        num_heads, head_dim: SSM heads and their width; ``num_heads * head_dim == expand * hidden_size``.
        state_size: state size N per head (the width of B and C).
        n_groups: groups of heads sharing B and C (as key/value groups in GQA); divides ``num_heads``.
        expand: inner width ``expand * hidden_size``. conv_kernel: short causal convolution width.
        chunk_size: chunk length of the chunked scan; None (the default) lets each backend choose
            (``zoo.ops.retention.default_chunk_size``: from the head sizes on the CPU path, 64 for the Triton
            kernels). Converted transformers checkpoints keep None: transformers' ``chunk_size`` (256 by default)
            is a setting of its own kernels, and zoo's CPU path runs 3-4x slower at 256 than at its own choice.
        time_step_min, time_step_max, time_step_floor: initialisation of ``dt`` (log-uniform between min and max).
        time_step_limit: ``dt`` is clamped to this (min, max) after the softplus.
        time_step_rank: kept for checkpoint compatibility (unused by Mamba-2).
        use_bias, use_conv_bias: biases of the projections / the convolution.
        hidden_act: activation after the convolution.
        layer_norm_epsilon: epsilon of the block norms and of the gated group norm.
        residual_in_fp32: keep the residual stream in float32.
        rescale_prenorm_residual: divide ``out_proj`` by sqrt(num_hidden_layers) at initialisation.
        backend: op backend (``naive``/``torch``/``triton``); ``None`` chooses by device.
    """

    model_type = "zoo_mamba2"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 768
    num_heads: int = 24
    head_dim: int = 64
    state_size: int = 128
    num_hidden_layers: int = 24
    n_groups: int = 1
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int | None = None
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list | tuple = (0.0, float("inf"))
    time_step_rank: int | str = "auto"
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    rescale_prenorm_residual: bool = False
    backend: str | None = None
    initializer_range: float = 0.1
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False

    def derive_fields(self) -> None:
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        self.time_step_limit = tuple(float(x) for x in self.time_step_limit)

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    def validate_fields(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "head_dim", "state_size", "num_hidden_layers"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(
            self.num_heads * self.head_dim == self.intermediate_size,
            "num_heads",
            f"* head_dim ({self.num_heads * self.head_dim}) must equal expand * hidden_size ({self.intermediate_size})",
        )
        self._require(
            self.chunk_size is None or self.chunk_size > 0, "chunk_size", "must be positive (or None: chosen per backend)"
        )
        self._require(
            self.n_groups > 0 and self.num_heads % self.n_groups == 0,
            "n_groups",
            f"must be positive and divide num_heads={self.num_heads}",
        )
        self._require(
            len(self.time_step_limit) == 2 and 0 <= self.time_step_limit[0] <= self.time_step_limit[1],
            "time_step_limit",
            "must be (min, max) with 0 <= min <= max",
        )
        self._require(
            self.backend in (None, "naive", "torch", "triton"),
            "backend",
            "must be one of None, 'naive', 'torch', 'triton'",
        )


__all__ = ["ZooMamba2Config"]
