"""Configuration of zoo's Mamba/attention hybrids: Samba (Ren et al., 2024, "Samba: Simple Hybrid State Space
Models for Efficient Unlimited Context Language Modeling", arXiv:2406.07522) and the Mamba-2-Hybrid of Waleffe et
al. (2024, "An Empirical Study of Mamba-based Language Models", arXiv:2406.07887), of which IBM's Bamba is one."""

from __future__ import annotations

import math

from transformers import PretrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from zoo.models.mamba.configuration_mamba import ZooMambaConfig
from zoo.models.mamba2.configuration_mamba2 import ZooMamba2Config
from zoo.models.utils import CACHE_NAME, ZooConfig

MIXERS = ("mamba", "mamba2", "attention", "sliding_attention")
# The mixer fields a hybrid may set per kind (the rest is shared: hidden_size, hidden_act, norms' epsilon, ...)
MAMBA_FIELDS = (
    "state_size",
    "expand",
    "conv_kernel",
    "time_step_rank",
    "time_step_scale",
    "time_step_min",
    "time_step_max",
    "time_step_init_scheme",
    "time_step_floor",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "rescale_prenorm_residual",
    "mixer_rms_norm",
    "mixer_rms_eps",
)
MAMBA2_FIELDS = (
    "num_heads",
    "head_dim",
    "state_size",
    "n_groups",
    "expand",
    "conv_kernel",
    "chunk_size",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
    "time_step_limit",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "rescale_prenorm_residual",
)


class ZooHybridConfig(ZooConfig):
    r"""(Named apart from transformers' config classes: the Auto classes key configs by class name.)

    A stack of pre-norm blocks, each ``x + mixer(norm(x))`` optionally followed by ``x + mlp(norm(x))``, where the
    mixer of layer i is ``layer_types[i]``:

    - ``"mamba"``: zoo's Mamba-1 mixer (selective scan), sized by ``mamba``;
    - ``"mamba2"``: zoo's Mamba-2 mixer (state-space duality), sized by ``mamba2``;
    - ``"attention"``: causal softmax attention over the whole past (``zoo.modules.Attention``, rotary positions);
    - ``"sliding_attention"``: the same over the last ``sliding_window`` tokens, with a bounded KV cache.

    Samba is ``["mamba", "sliding_attention"] * n`` with an MLP after every mixer; Mamba-2-Hybrid / Bamba is mostly
    ``"mamba2"`` with a few ``"attention"`` layers, an MLP after each.

    Args:
        vocab_size, hidden_size: as usual.
        layer_types: the mixer of each layer (see above); its length is the number of layers.
        num_hidden_layers: derived from ``layer_types`` (given, it must equal its length).
        mlp_layers: whether a gated MLP follows the mixer: one bool for every layer, or one per layer.
        intermediate_size: width of the MLPs. hidden_act: their activation (and the Mamba mixers' unless
            ``mamba`` / ``mamba2`` set their own). mlp_bias: biases in the MLPs.
        num_attention_heads, num_key_value_heads, head_dim: attention heads (grouped-query when fewer key/value
            heads); ``head_dim`` defaults to ``hidden_size // num_attention_heads``.
        attention_bias, attention_dropout: of the attention layers.
        sliding_window: how many tokens (the current one included) a ``sliding_attention`` layer sees.
        max_position_embeddings: the training context (rotary positions are not limited by it).
        rope_parameters: transformers' RoPE dict (``rope_type``, ``rope_theta``, ...); its
            ``partial_rotary_factor`` (Bamba: 0.5) rotates only that fraction of each head's channels.
        mamba: fields of ``ZooMambaConfig`` for the ``"mamba"`` mixers (``state_size``, ``expand``, ``conv_kernel``,
            ``time_step_rank``, ``mixer_rms_norm``, ...).
        mamba2: fields of ``ZooMamba2Config`` for the ``"mamba2"`` mixers (``num_heads`` or ``head_dim``,
            ``state_size``, ``n_groups``, ``expand``, ``chunk_size``, ...); with only one of ``num_heads`` /
            ``head_dim`` the other is derived (``head_dim`` defaults to 64).
        rms_norm_eps: epsilon of every RMS norm (the Mamba-2 mixers' gated norm included).
        backend: op backend of the Mamba mixers (``naive``/``torch``/``triton``); ``None`` chooses by device.
        initializer_range: standard deviation of the embeddings and linear layers.
        tie_word_embeddings: share the input embedding with the output projection.
    """

    model_type = "zoo_hybrid"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 256
    layer_types: list | tuple = ("mamba2", "mamba2", "mamba2", "attention")
    num_hidden_layers: int | None = None
    mlp_layers: bool | list | tuple = True
    intermediate_size: int = 512
    hidden_act: str = "silu"
    mlp_bias: bool = False
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    rope_parameters: RopeParameters | dict | None = None
    mamba: dict | None = None
    mamba2: dict | None = None
    rms_norm_eps: float = 1e-5
    backend: str | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        layer_types = list(self.layer_types)
        super().__post_init__(**kwargs)
        # transformers renames some legacy layer-type names ("mamba", "attention") at the end of its own
        # __post_init__; zoo's names are kept as given
        self.layer_types = layer_types

    def validate(self) -> None:
        """transformers' class checks but its layer-type one, which knows only transformers' own names (zoo's are
        checked in ``validate_fields``)."""
        for validator in PretrainedConfig.__class_validators__:
            if validator.__name__ != "validate_layer_type":
                validator(self)

    def derive_fields(self) -> None:
        self.layer_types = list(self.layer_types)
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.layer_types)
        if isinstance(self.mlp_layers, (list, tuple)):
            self.mlp_layers = [bool(m) for m in self.mlp_layers]
        if self.head_dim is None:
            self._require(
                self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"must be positive and divide hidden_size={self.hidden_size} (or set head_dim)",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.mamba = dict(self.mamba or {})
        self.mamba2 = dict(self.mamba2 or {})
        if "num_heads" not in self.mamba2 or "head_dim" not in self.mamba2:
            inner = self.mamba2.get("expand", 2) * self.hidden_size
            if "num_heads" in self.mamba2:
                self.mamba2["head_dim"] = inner // max(self.mamba2["num_heads"], 1)
            else:
                self.mamba2.setdefault("head_dim", 64)
                self.mamba2["num_heads"] = max(inner // self.mamba2["head_dim"], 1)
        if "time_step_limit" in self.mamba2:
            self.mamba2["time_step_limit"] = [float(x) for x in self.mamba2["time_step_limit"]]

    def validate_fields(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(len(self.layer_types) > 0, "layer_types", "must name at least one layer")
        bad = [t for t in self.layer_types if t not in MIXERS]
        self._require(not bad, "layer_types", f"has {bad}; each entry must be one of {MIXERS}")
        self._require(
            self.num_hidden_layers == len(self.layer_types),
            "num_hidden_layers",
            f"must equal len(layer_types)={len(self.layer_types)}",
        )
        self._require(
            isinstance(self.mlp_layers, bool) or len(self.mlp_layers) == len(self.layer_types),
            "mlp_layers",
            f"must be a bool or one bool per layer ({len(self.layer_types)})",
        )
        self._require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        self._require(
            self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "must be even for rotary positions"
        )
        self._require(
            self.sliding_window is not None or "sliding_attention" not in self.layer_types,
            "sliding_window",
            "must be set when layer_types has 'sliding_attention'",
        )
        self._require(
            self.sliding_window is None or self.sliding_window > 0, "sliding_window", "must be positive"
        )
        self._require(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")
        self._require(
            self.backend in (None, "naive", "torch", "triton"),
            "backend",
            "must be one of None, 'naive', 'torch', 'triton'",
        )
        for kind, allowed in (("mamba", MAMBA_FIELDS), ("mamba2", MAMBA2_FIELDS)):
            unknown = sorted(set(getattr(self, kind)) - set(allowed))
            self._require(not unknown, kind, f"has unknown fields {unknown}; known: {allowed}")
            if kind in self.layer_types:
                self.mixer_config(kind)  # the mixer's own checks, named under this field

    def mlp_after(self, layer_idx: int) -> bool:
        """Whether an MLP follows the mixer of layer ``layer_idx``."""
        return self.mlp_layers if isinstance(self.mlp_layers, bool) else self.mlp_layers[layer_idx]

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary positions rotate (``partial_rotary_factor`` of ``head_dim``)."""
        factor = (self.rope_parameters or {}).get("partial_rotary_factor", 1.0)
        return 2 * math.floor(self.head_dim * factor / 2)

    def mixer_config(self, kind: str) -> ZooMambaConfig | ZooMamba2Config:
        """The config of the ``"mamba"`` or ``"mamba2"`` mixers: their fields plus the shared sizes."""
        shared = dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            hidden_act=self.hidden_act,
            layer_norm_epsilon=self.rms_norm_eps,
            backend=self.backend,
            initializer_range=self.initializer_range,
            vocab_size=self.vocab_size,
        )
        config_class = ZooMambaConfig if kind == "mamba" else ZooMamba2Config
        try:
            return config_class(**{**shared, **getattr(self, kind)})
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {kind}: {err}") from None


__all__ = ["ZooHybridConfig"]
