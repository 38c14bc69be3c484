"""Configuration of zoo's Longformer (Beltagy et al. 2020, "Longformer: The Long-Document Transformer",
arXiv:2004.05150)."""

from __future__ import annotations

from zoo.models.utils import CACHE_NAME, ZooConfig, strict_config


@strict_config
class ZooLongformerConfig(ZooConfig):
    r"""A RoBERTa-style encoder whose self-attention is Longformer's: a sliding window plus global tokens.

    Named ``ZooLongformerConfig`` (``model_type="zoo_longformer"``) beside transformers' ``LongformerConfig``, whose
    checkpoints convert to this one (``python -m zoo.convert``).

    Args:
        vocab_size: number of token ids; 259 fits zoo's byte-level tokenizer.
        hidden_size: width of the residual stream.
        num_hidden_layers: number of layers.
        num_attention_heads: attention heads (they divide ``hidden_size``).
        intermediate_size: width of the feed-forward hidden layer.
        hidden_act: activation of the feed-forward layer and of the masked-LM head.
        hidden_dropout_prob: dropout on embeddings and on each sublayer's output while training.
        attention_probs_dropout_prob: dropout on attention weights while training.
        max_position_embeddings: rows of the learned position table. As in RoBERTa, positions start after
            ``pad_token_id`` (row ``pad_token_id + 1`` is the first token's), so a sequence may hold
            ``max_position_embeddings - pad_token_id - 1`` tokens.
        type_vocab_size: rows of the token-type table (segment embeddings).
        initializer_range: standard deviation of the normal initialisation.
        layer_norm_eps: epsilon of the LayerNorms.
        attention_window: one even number per layer (or one for all): the window around each token, in tokens.
            The encoder attends ``attention_window / 2`` tokens on each side; the causal variant
            (``causal=True``, which ``ZooLongformerForCausalLM`` sets) the ``attention_window`` tokens before each
            token, the same number of keys.
        causal: attend only to earlier tokens (the language-model variant); global tokens are then refused.
        tie_word_embeddings: share the input embedding with the output projection of the language-model heads.
        classifier_dropout: dropout of the classification heads; ``None`` uses ``hidden_dropout_prob``.
    """

    model_type = "zoo_longformer"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 259
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    hidden_dropout_prob: int | float = 0.1
    attention_probs_dropout_prob: int | float = 0.1
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    attention_window: int | list[int] = 512
    causal: bool = False
    classifier_dropout: int | float | None = None
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    sep_token_id: int | None = 2
    tie_word_embeddings: bool = True

    def derive_fields(self) -> None:
        if isinstance(self.attention_window, int):
            self.attention_window = [self.attention_window] * self.num_hidden_layers

    @property
    def position_offset(self) -> int:
        """Row of the position table of the first token: ``pad_token_id + 1``, as RoBERTa numbers positions."""
        return 0 if self.pad_token_id is None else self.pad_token_id + 1

    def validate_fields(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "type_vocab_size",
        ):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size={self.hidden_size}",
        )
        self._require(
            len(self.attention_window) == self.num_hidden_layers,
            "attention_window",
            f"must be one number or one per layer (num_hidden_layers={self.num_hidden_layers})",
        )
        self._require(
            all(w > 0 and w % 2 == 0 for w in self.attention_window),
            "attention_window",
            "must hold positive even numbers (the window is attention_window / 2 on each side)",
        )
        self._require(
            self.max_position_embeddings > self.position_offset,
            "max_position_embeddings",
            f"must exceed pad_token_id + 1 = {self.position_offset} (positions start after the padding row)",
        )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            self._require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")


__all__ = ["ZooLongformerConfig"]
