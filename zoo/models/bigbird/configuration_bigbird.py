"""Configuration of zoo's BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences",
arXiv:2007.14062)."""

from __future__ import annotations

from zoo.models.utils import CACHE_NAME, ZooConfig, strict_config


@strict_config
class ZooBigBirdConfig(ZooConfig):
    r"""A BERT-style post-norm encoder whose self-attention is BigBird's block-sparse ITC layout.

    Named ``ZooBigBirdConfig`` (``model_type="zoo_bigbird"``) beside transformers' ``BigBirdConfig``, whose
    checkpoints convert to this one (``python -m zoo.convert``).

    Args:
        vocab_size: number of token ids; 259 fits zoo's byte-level tokenizer.
        hidden_size: width of the residual stream.
        num_hidden_layers: number of layers.
        num_attention_heads: attention heads (they divide ``hidden_size``).
        intermediate_size: width of the feed-forward hidden layer.
        hidden_act: activation of the feed-forward layer and of the heads (BigBird's ``gelu_new``).
        hidden_dropout_prob: dropout on embeddings (before their LayerNorm, as in BigBird) and on sublayer outputs.
        attention_probs_dropout_prob: dropout on attention weights while training.
        max_position_embeddings: rows of the learned position table (positions start at 0).
        type_vocab_size: rows of the token-type table.
        initializer_range: standard deviation of the normal initialisation.
        layer_norm_eps: epsilon of the LayerNorms.
        attention_type: ``"block_sparse"`` (BigBird's layout) or ``"original_full"`` (dense attention).
        block_size: tokens per block of the layout.
        window_blocks: the sliding window in blocks: 3 (the query's block and one on each side) in the encoder;
            the causal variant attends the query's block and the ``window_blocks - 1`` before it.
        global_blocks: global blocks at each end (the first and the last; causal: the first only).
        num_random_blocks: random key blocks per query block and head.
        random_seed: seed of the random plan; layer ``i`` draws with ``random_seed + i``. The plan is the same in
            training and evaluation.
        use_bias: biases of the query, key and value projections.
        rescale_embeddings: multiply token embeddings by ``hidden_size ** 0.5``.
        causal: attend only earlier tokens (the language-model variant, which ``ZooBigBirdForCausalLM`` sets).
        transformers_compat: reproduce transformers' ``BigBirdModel`` in eval mode, for parity: its random plan
            points every random block at block 0 (which then weighs ``1 + num_random_blocks`` times), the layout
            is placed by raw index from the first (padding included) token, and a ``block_sparse`` input of at
            most ``(5 + 2 * num_random_blocks) * block_size`` tokens runs full attention. Off (zoo's default), the
            plan is the seeded one, the layout of each sequence starts at its first real token (padding and
            packed documents change nothing), and no switch is needed: for short inputs the seeded plan takes
            every candidate block, which is full attention.
        tie_word_embeddings: share the input embedding with the language-model decoder.
        classifier_dropout: dropout of the classification head; ``None`` uses ``hidden_dropout_prob``.
    """

    model_type = "zoo_bigbird"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: int | float = 0.1
    attention_probs_dropout_prob: int | float = 0.1
    max_position_embeddings: int = 4096
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attention_type: str = "block_sparse"
    block_size: int = 64
    window_blocks: int = 3
    global_blocks: int = 1
    num_random_blocks: int = 3
    random_seed: int = 0
    use_bias: bool = True
    rescale_embeddings: bool = False
    causal: bool = False
    transformers_compat: bool = False
    classifier_dropout: int | float | None = None
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sep_token_id: int | None = 66
    tie_word_embeddings: bool = True

    def validate_fields(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "type_vocab_size",
            "max_position_embeddings",
            "block_size",
            "window_blocks",
        ):
            self._require(getattr(self, name) > 0, name, "must be positive")
        for name in ("global_blocks", "num_random_blocks", "random_seed"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size={self.hidden_size}",
        )
        self._require(
            self.attention_type in ("block_sparse", "original_full"),
            "attention_type",
            "must be 'block_sparse' or 'original_full'",
        )
        self._require(
            self.causal or self.window_blocks % 2 == 1,
            "window_blocks",
            "must be odd in the bidirectional encoder (centred on the query block)",
        )
        if self.transformers_compat and not self.causal:
            self._require(
                self.window_blocks == 3 and self.global_blocks == 1,
                "transformers_compat",
                f"reproduces transformers' layout only: window_blocks=3, global_blocks=1 (got {self.window_blocks}, "
                f"{self.global_blocks})",
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            self._require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")


__all__ = ["ZooBigBirdConfig"]
