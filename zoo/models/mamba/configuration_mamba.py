"""Configuration of Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752), field for field as transformers' ``MambaConfig`` so that its checkpoints convert by renaming."""

from __future__ import annotations

import math

from zoo.models.utils import CACHE_NAME, ZooConfig


class ZooMambaConfig(ZooConfig):
    r"""(Named apart from transformers' ``MambaConfig``: the Auto classes key configs by class name.)

    A stack of Mamba blocks: ``x + mixer(norm(x))``, where the mixer is a gated selective state-space scan.

    Args:
        vocab_size: number of token ids; 259 fits the byte-level default tokenizer.
        hidden_size: width of the residual stream (``d_model``).
        state_size: SSM state size per channel (``d_state``, N).
        num_hidden_layers: number of blocks.
        expand: the mixer's inner width is ``expand * hidden_size`` (``intermediate_size``, derived).
        conv_kernel: width of the short causal depthwise convolution (``d_conv``).
        time_step_rank: rank of the low-rank time-step projection; ``"auto"`` is ``ceil(hidden_size / 16)``.
        time_step_min, time_step_max, time_step_floor, time_step_scale, time_step_init_scheme: initialisation
            of the time step (``dt`` uniform in log space between min and max; ``"random"`` or ``"constant"``
            weights of ``dt_proj``).
        use_bias: bias in ``in_proj`` / ``out_proj``. use_conv_bias: bias of the convolution.
        hidden_act: activation after the convolution and of the output gate.
        layer_norm_epsilon: epsilon of the RMS norms.
        residual_in_fp32: keep the residual stream in float32.
        rescale_prenorm_residual: divide ``out_proj`` by sqrt(num_hidden_layers) at initialisation (GPT-2 scheme).
        mixer_rms_norm: RMS-normalise (without weight) the time step, B and C inside the mixer, as FalconMamba
            (Zuo et al., 2024, arXiv:2410.05355) does; ``mixer_rms_eps`` is that norm's epsilon.
        backend: op backend (``naive``/``torch``/``triton``); ``None`` chooses by device.
        initializer_range: standard deviation of the embeddings and linear layers.
        tie_word_embeddings: share the input embedding with the output projection (Mamba's default).
    """

    model_type = "zoo_mamba"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 24
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | str = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    rescale_prenorm_residual: bool = False
    mixer_rms_norm: bool = False
    mixer_rms_eps: float = 1e-6
    backend: str | None = None
    initializer_range: float = 0.1
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = True

    def derive_fields(self) -> None:
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)

    @property
    def intermediate_size(self) -> int:
        """Width of the mixer's inner channels."""
        return self.expand * self.hidden_size

    def validate_fields(self) -> None:
        for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(
            isinstance(self.time_step_rank, int) and self.time_step_rank > 0,
            "time_step_rank",
            "must be a positive integer or 'auto'",
        )
        self._require(
            0 < self.time_step_min <= self.time_step_max, "time_step_min", "must lie in (0, time_step_max]"
        )
        self._require(self.mixer_rms_eps > 0, "mixer_rms_eps", "must be positive")
        self._require(
            self.time_step_init_scheme in ("random", "constant"),
            "time_step_init_scheme",
            "must be 'random' or 'constant'",
        )
        self._require(
            self.backend in (None, "naive", "torch", "triton"),
            "backend",
            "must be one of None, 'naive', 'torch', 'triton'",
        )


__all__ = ["ZooMambaConfig"]
