"""Configuration of zoo's Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv:2001.04451)."""

from __future__ import annotations

import math

from zoo.models.utils import CACHE_NAME, ZooConfig, strict_config


def default_num_buckets(seq_len: int, chunk_length: int, max_position_embeddings: int) -> int | list[int]:
    """The bucket count transformers' Reformer picks when none is set: the power of two nearest below
    ``2 * seq_len / chunk_length``, factorised into two powers of two when over
    ``2 * max(sqrt(max_position_embeddings / chunk_length), chunk_length)``."""
    power = (2 * (seq_len // chunk_length)).bit_length() - 1
    limit = 2 * max(int((max_position_embeddings // chunk_length) ** 0.5), chunk_length)
    if 2**power > limit:
        return [2 ** (power // 2), 2 ** (power - power // 2)]
    return 2**power


@strict_config
class ZooReformerConfig(ZooConfig):
    r"""Reformer: reversible layers of local or LSH attention and chunked feed-forward, axial positions.

    Named ``ZooReformerConfig`` (``model_type="zoo_reformer"``) beside transformers' ``ReformerConfig``; the field
    names are transformers' so that its checkpoints convert field by field (``python -m zoo.convert``).

    Args:
        vocab_size: number of token ids; 259 fits zoo's byte-level tokenizer.
        hidden_size: width of each of the two reversible streams (the output is their concatenation, 2x wide).
        num_attention_heads, attention_head_size: heads and their width (need not divide ``hidden_size``).
        attn_layers: per layer ``"local"`` or ``"lsh"`` (a single string: every layer the same).
        num_hidden_layers: layers; defaults to ``len(attn_layers)``.
        feed_forward_size: width of the feed-forward hidden layer; ``hidden_act`` its activation.
        chunk_size_feed_forward: positions per feed-forward chunk (0: all at once); the output is the same.
        local_attn_chunk_length, local_num_chunks_before, local_num_chunks_after: local attention's chunks of
            positions and the neighbouring chunks each one attends.
        lsh_attn_chunk_length, lsh_num_chunks_before, lsh_num_chunks_after: the same over the hashed order.
        num_hashes: hashing rounds of LSH attention.
        num_buckets: buckets per round, even (or a list of even factors). Unset, it is chosen from
            ``max_position_embeddings`` when the config is built (``transformers_compat``: from the first input
            longer than a chunk, and written into the config then, as transformers does).
        hash_seed: seed of the random rotations. zoo draws one rotation tensor per LSH layer (seed
            ``hash_seed + layer index``) once, on the CPU, into a buffer saved with the weights.
        transformers_compat: hash as transformers' Reformer does, for parity with its checkpoints: every LSH
            layer draws the same rotations at every forward, from a generator seeded with ``hash_seed`` on the
            activations' device and in their dtype (none of the global random state is used); ``num_buckets``
            may stay unset until the first long input.
        is_decoder: causal attention (the language-model variant; ``ZooReformerForCausalLM`` sets it).
        axial_pos_embds: axial position embeddings (two tables of ``axial_pos_shape`` rows, ``axial_pos_embds_dim``
            wide, concatenated; their product of rows bounds the length), else a table of
            ``max_position_embeddings`` rows.
        axial_norm_std: standard deviation of the axial tables' initialisation.
        reversible: train with reversible residual layers (activations recomputed in the backward, not stored);
            False uses ordinary autograd (same gradients, memory growing with depth).
        hidden_dropout_prob, local_attention_probs_dropout_prob, lsh_attention_probs_dropout_prob: dropouts.
        tie_word_embeddings: share the input embedding with the LM head, which then reads the sum of the two
            streams (a width-``hidden_size`` projection) instead of their concatenation.
        classifier_dropout: dropout of the classification head; ``None`` uses ``hidden_dropout_prob``.
    """

    model_type = "zoo_reformer"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 256
    num_attention_heads: int = 4
    attention_head_size: int = 64
    attn_layers: str | list[str] = "local"
    num_hidden_layers: int | None = None
    feed_forward_size: int = 512
    hidden_act: str = "relu"
    chunk_size_feed_forward: int = 0
    local_attn_chunk_length: int = 64
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    lsh_attn_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    num_hashes: int = 1
    num_buckets: int | list[int] | None = None
    hash_seed: int | None = 0
    transformers_compat: bool = False
    is_decoder: bool = False
    axial_pos_embds: bool = True
    axial_pos_shape: list[int] | None = None
    axial_pos_embds_dim: list[int] | None = None
    axial_norm_std: float = 1.0
    max_position_embeddings: int = 4096
    reversible: bool = True
    hidden_dropout_prob: int | float = 0.0
    local_attention_probs_dropout_prob: int | float = 0.0
    lsh_attention_probs_dropout_prob: int | float = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    classifier_dropout: int | float | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1

    def derive_fields(self) -> None:
        if isinstance(self.attn_layers, str):
            self.attn_layers = [self.attn_layers] * (self.num_hidden_layers or 2)
        self.attn_layers = list(self.attn_layers)
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.attn_layers)
        if self.axial_pos_shape is None:
            side = 2 ** math.ceil(math.log2(max(self.max_position_embeddings, 4)) / 2)
            self.axial_pos_shape = [side, -(-self.max_position_embeddings // side)]
        self.axial_pos_shape = list(self.axial_pos_shape)
        if self.axial_pos_embds_dim is None:
            self.axial_pos_embds_dim = [self.hidden_size // 4, self.hidden_size - self.hidden_size // 4]
        self.axial_pos_embds_dim = list(self.axial_pos_embds_dim)
        if self.num_buckets is None and not self.transformers_compat and "lsh" in self.attn_layers:
            long = max(self.max_position_embeddings, 2 * self.lsh_attn_chunk_length)
            self.num_buckets = default_num_buckets(
                long, self.lsh_attn_chunk_length, self.max_position_embeddings
            )

    @property
    def chunk_multiple(self) -> int:
        """Inputs longer than the shortest chunk are padded to a multiple of the chunks' least common multiple."""
        return math.lcm(*self.chunk_lengths)

    @property
    def chunk_lengths(self) -> list[int]:
        kinds = set(self.attn_layers)
        return [
            n
            for kind, n in (("local", self.local_attn_chunk_length), ("lsh", self.lsh_attn_chunk_length))
            if kind in kinds
        ]

    def validate_fields(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "attention_head_size",
            "feed_forward_size",
            "num_hashes",
            "local_attn_chunk_length",
            "lsh_attn_chunk_length",
        ):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(
            all(kind in ("local", "lsh") for kind in self.attn_layers),
            "attn_layers",
            "must hold only 'local' and 'lsh'",
        )
        self._require(
            self.num_hidden_layers == len(self.attn_layers),
            "num_hidden_layers",
            f"must equal the number of attn_layers ({len(self.attn_layers)})",
        )
        for name in (
            "local_num_chunks_before",
            "local_num_chunks_after",
            "lsh_num_chunks_before",
            "lsh_num_chunks_after",
            "chunk_size_feed_forward",
        ):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        if self.is_decoder:
            for name in ("local_num_chunks_after", "lsh_num_chunks_after"):
                self._require(
                    getattr(self, name) == 0, name, "must be 0 for a causal model (is_decoder=True)"
                )
        if self.num_buckets is not None:
            factors = [self.num_buckets] if isinstance(self.num_buckets, int) else self.num_buckets
            self._require(
                len(factors) > 0 and all(f >= 2 and f % 2 == 0 for f in factors),
                "num_buckets",
                "must be an even integer >= 2 or a list of them",
            )
        if not self.transformers_compat and "lsh" in self.attn_layers:
            self._require(self.hash_seed is not None, "hash_seed", "must be set (it seeds the rotations)")
        if self.axial_pos_embds:
            self._require(len(self.axial_pos_shape) == 2, "axial_pos_shape", "must hold two numbers")
            self._require(
                len(self.axial_pos_embds_dim) == 2 and sum(self.axial_pos_embds_dim) == self.hidden_size,
                "axial_pos_embds_dim",
                f"must hold two numbers summing to hidden_size={self.hidden_size}",
            )
        for name in (
            "hidden_dropout_prob",
            "local_attention_probs_dropout_prob",
            "lsh_attention_probs_dropout_prob",
        ):
            self._require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")

    @property
    def max_positions(self) -> int:
        """Longest input the position embeddings cover."""
        if self.axial_pos_embds:
            return self.axial_pos_shape[0] * self.axial_pos_shape[1]
        return self.max_position_embeddings


__all__ = ["ZooReformerConfig"]
