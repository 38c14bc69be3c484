"""Configuration of RWKV, versions 4, 6 and 7 in one class.

RWKV-4 (Peng et al., 2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048), RWKV-6 "Finch"
(Peng et al., 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence", arXiv:2404.05892)
and RWKV-7 "Goose" (Peng et al., 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution",
arXiv:2503.14456). The three share the block (token shift, time mixing, channel mixing) and differ in the time
mixing's recurrence, so one ``version`` field selects it.
"""

from __future__ import annotations

from zoo.models.utils import CACHE_NAME, ZooConfig

VERSIONS = (4, 6, 7)


def _lora_dim(factor: float, hidden_size: int, power: float) -> int:
    """RWKV-7's rule for its low-rank sizes: ``factor * C**power`` rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * hidden_size**power / 32)) * 32)


class ZooRwkvConfig(ZooConfig):
    r"""(Named apart from transformers' ``RwkvConfig``, which is RWKV-4 only.)

    A stack of RWKV blocks, ``x + time_mix(ln1(x))`` then ``x + channel_mix(ln2(x))``, after a layer norm of the
    embeddings (``ln0``) and before a final layer norm (``ln_out``).

    Args:
        version: 4 (WKV with per-channel decay and bonus, ``zoo.ops.wkv4``), 6 (matrix-valued state with
            data-dependent decay and token shift, ``zoo.ops.gla``) or 7 (generalised delta rule with in-context
            learning rate and value residual, ``zoo.ops.delta_rule``).
        vocab_size: number of token ids; 259 fits the byte-level default tokenizer.
        hidden_size: width of the residual stream (``n_embd``).
        num_hidden_layers: number of blocks (``n_layer``).
        attention_hidden_size: width of the time mixing (``dim_att``); ``None`` is ``hidden_size`` (RWKV-7 needs
            it equal to ``hidden_size``).
        intermediate_size: width of the channel mixing (``dim_ffn``); ``None`` is ``4 * hidden_size`` for
            versions 4 and 7 and ``int(3.5 * hidden_size) // 32 * 32`` for version 6.
        head_size: width of a head of the matrix-valued state (versions 6 and 7); ``attention_hidden_size`` must
            be a multiple of it.
        proj_low_rank_dim: rank of RWKV-6's data-dependent token shift (``time_maa_w1``); ``None`` is 32.
        decay_low_rank_dim: rank of the data-dependent decay (RWKV-6 ``time_decay_w1``, RWKV-7 ``w1``); ``None``
            is 64 for version 6 and RWKV-7's rule ``max(32, round(1.8 sqrt(C) / 32) * 32)`` for version 7.
        a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim: ranks of RWKV-7's in-context learning rate (``a1``),
            value residual (``v1``) and output gate (``g1``); ``None`` follows RWKV-7's rules (factors 1.8, 1.3 of
            sqrt(C) and 0.6 of C**0.8).
        layer_norm_epsilon: epsilon of the block layer norms (``ln0``, ``ln1``, ``ln2``, ``ln_out``).
        group_norm_eps: epsilon of the per-head group norm of the time mixing's output (``ln_x``, versions 6 and
            7); 64e-5 is what the official training code and the ``rwkv`` package use (1e-5 times the square of
            a head-size divisor of 8), whatever the head size.
        backend: op backend (``naive``/``torch``/``triton``); ``None`` chooses by device.
        initializer_range: standard deviation of the embeddings (the mixings' projections are drawn with
            standard deviation ``in_features ** -0.5``, the scale of the reference code's orthogonal matrices).
        tie_word_embeddings: share the input embedding with the output head (RWKV does not by default).
    """

    model_type = "zoo_rwkv"
    keys_to_ignore_at_inference = [CACHE_NAME]

    version: int = 7
    vocab_size: int = 259
    hidden_size: int = 768
    num_hidden_layers: int = 12
    attention_hidden_size: int | None = None
    intermediate_size: int | None = None
    head_size: int = 64
    proj_low_rank_dim: int | None = None
    decay_low_rank_dim: int | None = None
    a_low_rank_dim: int | None = None
    v_low_rank_dim: int | None = None
    gate_low_rank_dim: int | None = None
    layer_norm_epsilon: float = 1e-5
    group_norm_eps: float = 64e-5
    backend: str | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False

    def derive_fields(self) -> None:
        C = self.hidden_size
        if self.attention_hidden_size is None:
            self.attention_hidden_size = C
        if self.intermediate_size is None:
            self.intermediate_size = int(3.5 * C) // 32 * 32 if self.version == 6 else 4 * C
        if self.version == 6:
            self.proj_low_rank_dim = self.proj_low_rank_dim or 32
            self.decay_low_rank_dim = self.decay_low_rank_dim or 64
        elif self.version == 7:
            self.decay_low_rank_dim = self.decay_low_rank_dim or _lora_dim(1.8, C, 0.5)
            self.a_low_rank_dim = self.a_low_rank_dim or _lora_dim(1.8, C, 0.5)
            self.v_low_rank_dim = self.v_low_rank_dim or _lora_dim(1.3, C, 0.5)
            self.gate_low_rank_dim = self.gate_low_rank_dim or _lora_dim(0.6, C, 0.8)

    @property
    def num_heads(self) -> int:
        """Heads of the matrix-valued state (versions 6 and 7)."""
        return self.attention_hidden_size // self.head_size

    def validate_fields(self) -> None:
        self._require(self.version in VERSIONS, "version", f"must be one of {VERSIONS}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size",
                     "intermediate_size", "head_size"):  # fmt: skip
            self._require(getattr(self, name) > 0, name, "must be positive")
        for name in ("proj_low_rank_dim", "decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim",
                     "gate_low_rank_dim"):  # fmt: skip
            value = getattr(self, name)
            self._require(value is None or value > 0, name, "must be positive")
        if self.version in (6, 7):
            self._require(
                self.attention_hidden_size % self.head_size == 0,
                "head_size",
                f"must divide attention_hidden_size={self.attention_hidden_size}",
            )
        if self.version == 7:
            self._require(
                self.attention_hidden_size == self.hidden_size,
                "attention_hidden_size",
                f"must equal hidden_size={self.hidden_size} for version 7",
            )
        self._require(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")
        self._require(self.group_norm_eps > 0, "group_norm_eps", "must be positive")
        self._require(
            self.backend in (None, "naive", "torch", "triton"),
            "backend",
            "must be one of None, 'naive', 'torch', 'triton'",
        )


__all__ = ["ZooRwkvConfig"]
