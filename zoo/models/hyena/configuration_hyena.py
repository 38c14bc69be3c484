"""Configuration of Hyena (Poli et al., 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models",
arXiv:2302.10866) and HyenaDNA (Nguyen et al., 2023, arXiv:2306.15794), with the hyperparameters of the reference
``HyenaOperator`` / ``HyenaFilter`` under transformers' names (the safari name in brackets)."""

from __future__ import annotations

from zoo.models.utils import CACHE_NAME, ZooConfig

FILTER_EXTENSIONS = ("extrapolate", "error")


class HyenaConfig(ZooConfig):
    r"""A stack of pre-norm blocks ``x + mixer(norm1(x))``, ``x + mlp(norm2(x))`` (LayerNorms, a GELU MLP), where the
    mixer is the Hyena operator: gated long convolutions whose filters a small network computes from positions.

    Args:
        vocab_size: number of token ids; 259 fits the byte-level default tokenizer.
        hidden_size: width of the residual stream (``d_model``).
        num_hidden_layers: number of blocks (``n_layer``).
        intermediate_size: width of the MLP (``d_inner``); None is ``4 * hidden_size``.
        max_position_embeddings: length of the filters' position grid (``l_max``): the positional features are
            stored for this many positions.
        filter_extension: what a sequence longer than the grid gets. ``"extrapolate"``: the positional features
            evaluated on the longer grid by their own formula (time t = j / (l_max - 1) going on past 1, the complex
            exponentials exp(-i f 2 pi j / l_max) going on turning, the decay going on decaying); ``"error"``: a
            ValueError. The reference cuts such inputs short silently; zoo never does.
        order: depth of the Hyena recurrence (N): N + 1 projections of the input, N - 1 long convolutions.
        filter_order: width of the filter network (safari's ``filter_order``, the ``order`` of ``HyenaFilter``).
        emb_dim: size of the positional features (odd, >= 3): time, and (emb_dim - 1) / 2 complex exponentials.
        filter_sin_freq: initial frequency of the filter network's sine activations (``w``).
        filter_inner_layers: hidden linear layers of the filter network (``num_inner_mlps``).
        filter_bias: use the filters' learnable skip term (``bias``; its weights exist either way).
        filter_normalized: divide each position's filter values by their L1 norm over channels, before the decay
            window (``normalized``).
        filter_modulate, filter_fast_decay_pct, filter_slow_decay_pct, filter_decay_target, filter_decay_shift:
            the exponential decay window of the filters (``modulate``, ``fast_decay_pct``, ``slow_decay_pct``,
            ``target``, ``shift``): channel decay rates from log(target) / slow to log(target) / fast.
        short_filter_order: width of the short depthwise convolution after the input projection.
        hidden_act: activation of the MLP (safari's tanh-approximated GELU).
        layer_norm_epsilon: epsilon of the LayerNorms.
        initializer_range: standard deviation of the embeddings and linear layers.
        rescale_prenorm_residual: divide ``out_proj`` and ``down_proj`` by sqrt(2 num_hidden_layers) at
            initialisation (GPT-2 scheme, safari's default).
        backend: op backend (``naive``/``torch``/``triton``); ``None`` chooses by device.
        tie_word_embeddings: share the input embedding with the output projection.
    """

    model_type = "zoo_hyena"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 256
    num_hidden_layers: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    filter_extension: str = "extrapolate"
    order: int = 2
    filter_order: int = 64
    emb_dim: int = 3
    filter_sin_freq: float = 1.0
    filter_inner_layers: int = 2
    filter_bias: bool = True
    filter_normalized: bool = False
    filter_modulate: bool = True
    filter_fast_decay_pct: float = 0.3
    filter_slow_decay_pct: float = 1.5
    filter_decay_target: float = 1e-2
    filter_decay_shift: float = 0.0
    short_filter_order: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    backend: str | None = None
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = True

    def derive_fields(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size

    def validate_fields(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "filter_order"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(self.max_position_embeddings >= 2, "max_position_embeddings", "must be at least 2")
        self._require(self.order >= 2, "order", "must be at least 2 (one long convolution)")
        self._require(
            self.emb_dim >= 3 and self.emb_dim % 2 == 1,
            "emb_dim",
            "must be odd and at least 3 (time, cos, sin)",
        )
        self._require(self.filter_inner_layers >= 0, "filter_inner_layers", "must be >= 0")
        self._require(self.short_filter_order >= 1, "short_filter_order", "must be at least 1")
        self._require(
            self.filter_extension in FILTER_EXTENSIONS,
            "filter_extension",
            f"must be one of {FILTER_EXTENSIONS}",
        )
        self._require(
            self.backend in (None, "naive", "torch", "triton"),
            "backend",
            "must be one of None, 'naive', 'torch', 'triton'",
        )


__all__ = ["HyenaConfig"]
