"""Longformer (Beltagy et al. 2020, "Longformer: The Long-Document Transformer", arXiv:2004.05150).

A RoBERTa-style post-norm encoder whose self-attention sees a sliding window of ``attention_window / 2`` tokens on
each side, plus global tokens chosen per task (``global_attention_mask``) that attend to, and are attended by, every
token. Global queries have their own query/key/value projections (``q_global_proj``/``k_global_proj``/
``v_global_proj``) and attend every key through them; the other queries reach the global keys through the regular
projections. The attention itself is ``zoo.ops.sparse_attention`` (O(T * w) memory).

``ZooLongformerForCausalLM`` is the causal variant for language modelling: each token attends itself and the
``attention_window`` tokens before it, and decodes with a key/value cache that holds only that window. Both language
models end in RoBERTa's LM head; with the window as its attention mask, the causal one equals transformers'
``RobertaForCausalLM``.

Weights convert from and to transformers' ``LongformerForMaskedLM`` (``convert_longformer.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.loss.loss_utils import (
    ForQuestionAnsweringLoss,
    ForSequenceClassificationLoss,
    ForTokenClassification,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from zoo.models.heads import BackboneHead, EncoderCausalLMHead, MaskedLMHead, last_token_index
from zoo.models.longformer.configuration_longformer import ZooLongformerConfig
from zoo.models.utils import CACHE_NAME, backbone_inputs, model_forward, with_cache
from zoo.modules.mlp import activation
from zoo.ops.sparse_attention import SparsePattern, sparse_attention, sparse_attention_step
from zoo.positional.learned import interpolate_position_embeddings


class LongformerSelfAttention(nn.Module):
    """Sliding-window attention with global tokens (their own projections; not in the causal variant), and the output
    projection."""

    def __init__(self, config: ZooLongformerConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.dropout = config.attention_probs_dropout_prob
        window = config.attention_window[layer_idx]
        self.pattern = SparsePattern(window=window if config.causal else window // 2, causal=config.causal)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(C, C) for _ in range(3))
        if not config.causal:  # the causal variant has no global tokens
            self.q_global_proj, self.k_global_proj, self.v_global_proj = (nn.Linear(C, C) for _ in range(3))
        self.o_proj = nn.Linear(C, C)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)  # (B, T, H, D)

    def forward(
        self, hidden_states, *, key_padding_mask, global_mask, segment_ids, cache, past_len, cache_mask
    ):
        B, T, C = hidden_states.shape
        q, k, v = (self._heads(p(hidden_states)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)  # (B, H, kv, D)
            if past_len > 0:
                kv = k_all.shape[2]
                mask = cache_mask[:, -kv:] if cache_mask is not None else None
                out = sparse_attention_step(
                    q, k_all.transpose(1, 2), v_all.transpose(1, 2), self.pattern, past_len=past_len,
                    key_padding_mask=mask,
                )  # fmt: skip
                return self.o_proj(out.reshape(B, T, C))
        glob = {}
        if global_mask is not None:
            glob = {
                "global_q": self._heads(self.q_global_proj(hidden_states)),
                "global_k": self._heads(self.k_global_proj(hidden_states)),
                "global_v": self._heads(self.v_global_proj(hidden_states)),
            }
        out = sparse_attention(
            q,
            k,
            v,
            self.pattern,
            global_mask=global_mask,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            dropout=self.dropout if self.training else 0.0,
            **glob,
        )  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, C))


class LongformerLayer(GradientCheckpointingLayer):
    """Post-norm: ``x = norm(x + attn(x))``, then ``x = norm(x + mlp(x))``."""

    def __init__(self, config: ZooLongformerConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.self_attn = LongformerSelfAttention(config, layer_idx)
        self.attn_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.up_proj = nn.Linear(C, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.down_proj = nn.Linear(config.intermediate_size, C)
        self.mlp_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states,
        key_padding_mask=None,
        global_mask=None,
        segment_ids=None,
        cache=None,
        past_len=0,
        cache_mask=None,
    ):
        attn = self.self_attn(
            hidden_states,
            key_padding_mask=key_padding_mask,
            global_mask=global_mask,
            segment_ids=segment_ids,
            cache=cache,
            past_len=past_len,
            cache_mask=cache_mask,
        )
        hidden_states = self.attn_norm(hidden_states + self.dropout(attn))
        mlp = self.down_proj(self.act(self.up_proj(hidden_states)))
        return self.mlp_norm(hidden_states + self.dropout(mlp))


class ZooLongformerPreTrainedModel(PreTrainedModel):
    config_class = ZooLongformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongformerLayer"]
    _skip_keys_device_placement = [CACHE_NAME]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the backbone builds its own cache, one window-sized layer per layer


class ZooLongformerModel(ZooLongformerPreTrainedModel):
    """Embeddings (token, position, token type; LayerNorm) and the layers; returns hidden states.

    Positions count real tokens from 0 (``zoo.models.utils``) and index the table from row ``pad_token_id + 1``,
    as RoBERTa does. With ``config.causal`` the layers attend backwards only and keep a key/value cache.
    """

    def __init__(self, config: ZooLongformerConfig):
        super().__init__(config)
        C = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(
            config.max_position_embeddings, C, padding_idx=config.pad_token_id
        )
        self.embed_token_types = nn.Embedding(config.type_vocab_size, C)
        self.embed_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(LongformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_cache(self) -> DynamicCache:
        """A key/value cache keeping, per layer, the ``attention_window`` latest tokens (causal variant only)."""
        cache = DynamicCache()
        cache.layers = [DynamicSlidingWindowLayer(sliding_window=w + 1) for w in self.config.attention_window]
        cache.layer_class_to_replicate = None
        return cache

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPast:
        """``global_attention_mask`` (B, T): 1 at the tokens with global attention (encoder only).
        ``attention_mask`` (B, past + T): 1 at real tokens."""
        causal = self.config.causal
        if not causal and (cache is not None or use_cache):
            raise ValueError(
                "ZooLongformerModel: the bidirectional encoder keeps no cache (use_cache, cache)"
            )
        if causal and global_attention_mask is not None:
            raise ValueError(
                "ZooLongformerModel: global_attention_mask is for the bidirectional encoder; this model is causal"
            )
        inputs = backbone_inputs(
            self,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache if causal else False,
            new_cache=self.new_cache,
            cache_class=DynamicCache,
        )
        B, T, _ = inputs.embeds.shape
        positions = inputs.position_ids + self.config.position_offset
        limit = self.config.max_position_embeddings
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= limit:
            raise ValueError(
                f"position {int(inputs.position_ids.max())} is past the {limit - self.config.position_offset} "
                f"positions of the table (max_position_embeddings={limit}, from row pad_token_id + 1); extend it "
                "with zoo.models.longformer.extend_position_embeddings"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=inputs.embeds.device)
        hidden_states = (
            inputs.embeds + self.embed_positions(positions) + self.embed_token_types(token_type_ids)
        )
        hidden_states = self.embed_dropout(self.embed_norm(hidden_states))

        key_padding_mask = inputs.pad_mask[:, -T:] if inputs.pad_mask is not None else None
        global_mask = None
        if global_attention_mask is not None and bool(global_attention_mask.any()):
            global_mask = global_attention_mask.bool()
        segment_ids = inputs.doc_starts.long().cumsum(-1) if inputs.doc_starts is not None else None
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                key_padding_mask=key_padding_mask,
                global_mask=global_mask,
                segment_ids=segment_ids,
                cache=inputs.cache,
                past_len=inputs.past_len,
                cache_mask=inputs.pad_mask,
            )
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return with_cache(
            BaseModelOutputWithPast, inputs.cache, last_hidden_state=hidden_states, hidden_states=all_hidden
        )


def _encode(head, **kwargs):
    """The backbone's forward without a cache."""
    return head.model(use_cache=False, **kwargs)


class ZooLongformerForMaskedLM(MaskedLMHead, ZooLongformerPreTrainedModel):
    """Masked language modelling through RoBERTa's head (:class:`zoo.models.heads.EncoderLMHead`)."""

    backbone_class = ZooLongformerModel

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> MaskedLMOutput:
        """``labels``: the original ids at masked positions, -100 elsewhere."""
        return self.masked_lm_output(
            labels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )


class ZooLongformerForCausalLM(EncoderCausalLMHead, ZooLongformerPreTrainedModel, GenerationMixin):
    """The causal sliding-window variant: language modelling and ``generate()`` with a window-sized cache, through
    RoBERTa's head (:class:`zoo.models.heads.EncoderCausalLMHead`)."""

    backbone_class = ZooLongformerModel


def _default_global(config, input_ids, attention_mask, global_attention_mask, rule):
    """The global attention mask a head uses when none is given: ``rule`` on the encoder, none when causal."""
    if global_attention_mask is not None or config.causal:
        return global_attention_mask
    return rule()


class ZooLongformerForSequenceClassification(BackboneHead, ZooLongformerPreTrainedModel):
    """Classifies the first token (``<s>``), given global attention by default, through ``dense``, tanh and
    ``score`` (RoBERTa's head); the causal variant classifies the last real token instead."""

    def __init__(self, config: ZooLongformerConfig):
        super().__init__(config)
        C = config.hidden_size
        self.num_labels = config.num_labels
        self.model = ZooLongformerModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.dense = nn.Linear(C, C)
        self.score = nn.Linear(C, config.num_labels)
        self.post_init()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutput:
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]

        def first_token():
            mask = torch.zeros(ref.shape[:2], dtype=torch.long, device=ref.device)
            mask[:, 0] = 1
            return mask

        global_attention_mask = _default_global(
            self.config, input_ids, attention_mask, global_attention_mask, first_token
        )
        out = _encode(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        B, T, _ = h.shape
        if self.config.causal:
            idx = last_token_index(
                B,
                T,
                attention_mask=attention_mask,
                input_ids=input_ids,
                pad_token_id=self.config.pad_token_id,
                device=h.device,
            )
        else:
            idx = torch.zeros(B, dtype=torch.long, device=h.device)
        pooled = h[torch.arange(B, device=h.device), idx]
        logits = self.score(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ZooLongformerForQuestionAnswering(BackboneHead, ZooLongformerPreTrainedModel):
    """Extractive QA: start and end logits per token (``qa_outputs``). Without a ``global_attention_mask``, the
    question (every token before the first ``sep_token_id`` of each row) gets global attention, as in the paper."""

    def __init__(self, config: ZooLongformerConfig):
        super().__init__(config)
        self.model = ZooLongformerModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def _question_mask(self, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(
                "ZooLongformerForQuestionAnswering: pass global_attention_mask with inputs_embeds"
            )
        is_sep = input_ids == self.config.sep_token_id
        if not bool(is_sep.any(-1).all()):
            raise ValueError(
                f"ZooLongformerForQuestionAnswering: a row has no sep_token_id={self.config.sep_token_id} to end its "
                "question; pass global_attention_mask"
            )
        first_sep = is_sep.int().argmax(-1, keepdim=True)
        return (torch.arange(input_ids.shape[1], device=input_ids.device)[None] < first_sep).long()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> QuestionAnsweringModelOutput:
        global_attention_mask = _default_global(
            self.config,
            input_ids,
            attention_mask,
            global_attention_mask,
            lambda: self._question_mask(input_ids),
        )
        out = _encode(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = ForQuestionAnsweringLoss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states
        )


class ZooLongformerForTokenClassification(BackboneHead, ZooLongformerPreTrainedModel):
    """A label per token (``score``), e.g. named entities."""

    def __init__(self, config: ZooLongformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ZooLongformerModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> TokenClassifierOutput:
        out = _encode(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = ForTokenClassification(logits, labels, self.config) if labels is not None else None
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


def extend_position_embeddings(
    model: ZooLongformerPreTrainedModel, new_max: int
) -> ZooLongformerPreTrainedModel:
    """Lengthen the learned position table of a zoo Longformer (any head) to ``new_max`` rows, in place, by copying
    the pretrained one; ``config.max_position_embeddings`` becomes ``new_max``. RoBERTa's layout is kept: rows
    ``0 ... pad_token_id`` (the padding row and those before it, never a real position) stay as they are, and the
    ``L - pad_token_id - 1`` learned positions after them are repeated to fill the new rows, as Beltagy et al. 2020
    (section 5) initialise Longformer's 4,096 positions from RoBERTa's 512 (``max_position_embeddings`` 514 ->
    4098). Outputs at lengths the old table covered are unchanged. Returns ``model``."""
    backbone = model if isinstance(model, ZooLongformerModel) else getattr(model, "model", None)
    if not isinstance(backbone, ZooLongformerModel):
        raise ValueError(f"extend_position_embeddings: {type(model).__name__} is not a zoo Longformer model")
    old = backbone.embed_positions
    if not isinstance(new_max, int) or new_max < old.num_embeddings:
        raise ValueError(
            f"extend_position_embeddings: new_max={new_max!r}, expected an integer >= the current "
            f"max_position_embeddings={old.num_embeddings}"
        )
    return interpolate_position_embeddings(
        model, new_max, mode="copy", offset=backbone.config.position_offset
    )


__all__ = [
    "ZooLongformerForCausalLM",
    "ZooLongformerForMaskedLM",
    "ZooLongformerForQuestionAnswering",
    "ZooLongformerForSequenceClassification",
    "ZooLongformerForTokenClassification",
    "ZooLongformerModel",
    "ZooLongformerPreTrainedModel",
    "extend_position_embeddings",
]
