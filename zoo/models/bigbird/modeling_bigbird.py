"""BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", arXiv:2007.14062).

A BERT-style post-norm encoder whose self-attention is BigBird's ITC block-sparse layout: in blocks of
``block_size`` tokens, each query block attends a window of 3 blocks, the first and last (global) blocks, which
attend everything, and ``num_random_blocks`` random blocks from a seeded plan. The attention is
``zoo.ops.sparse_attention`` (O(T * block_size) memory); ``attention_type="original_full"`` runs dense attention.

Padding and packed documents: the layout of each sequence starts at its first real token. A batch with padding or
packed documents (``position_ids`` restarting at 0) is regrouped, inside each attention layer, into one row per
sequence (:func:`sequence_rows`), so that a padded row attends exactly as the sequence alone. With
``transformers_compat`` the layout is placed by raw index instead, as transformers' ``BigBirdModel`` does.

``ZooBigBirdForCausalLM`` is the causal variant for language modelling: a query block attends itself (causally)
and the ``window_blocks - 1`` blocks before it, the first ``global_blocks`` blocks and random earlier blocks; it
decodes with a key/value cache of every token (the random blocks may reach any earlier block). The language models
end in BERT's LM head (dense, activation, LayerNorm, decoder), shared with zoo's Longformer.

Weights convert from transformers' ``BigBirdForMaskedLM`` (``convert_bigbird.py``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.loss.loss_utils import ForQuestionAnsweringLoss, ForSequenceClassificationLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

from zoo.models.bigbird.configuration_bigbird import ZooBigBirdConfig
from zoo.models.heads import BackboneHead, EncoderCausalLMHead, MaskedLMHead, last_token_index
from zoo.models.utils import CACHE_NAME, backbone_inputs, model_forward, with_cache
from zoo.modules.mlp import activation
from zoo.ops.sparse_attention import SparsePattern, sparse_attention, sparse_attention_step
from zoo.positional.learned import interpolate_position_embeddings


@dataclasses.dataclass
class SequenceRows:
    """Where each real token goes when a batch is regrouped into one row per sequence: token ``src[i]`` of the
    flattened (B * T) batch goes to slot ``target[i]`` of the flattened (rows, length) grid; ``mask`` marks the
    occupied slots."""

    src: torch.Tensor
    target: torch.Tensor
    rows: int
    length: int
    mask: torch.Tensor

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (rows, length, ...)."""
        flat = x.reshape(-1, *x.shape[2:])[self.src]
        grid = x.new_zeros(self.rows * self.length, *x.shape[2:]).index_copy(0, self.target, flat)
        return grid.view(self.rows, self.length, *x.shape[2:])

    def unpack(self, y: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """(rows, length, ...) -> (B, T, ...), zeros at padding."""
        flat = y.reshape(-1, *y.shape[2:])[self.target]
        return y.new_zeros(B * T, *y.shape[2:]).index_copy(0, self.src, flat).view(B, T, *y.shape[2:])


@torch.compiler.disable
def sequence_rows(real: torch.Tensor, doc_starts: torch.Tensor | None) -> SequenceRows:
    """One row per sequence (per document of each row when packed), real tokens only, in order from column 0.
    ``real`` (B, T) bool; ``doc_starts`` (B, T) bool or None. Data-dependent sizes: left out of compiled graphs."""
    B, T = real.shape
    device = real.device
    starts = torch.zeros(B, T, dtype=torch.bool, device=device) if doc_starts is None else doc_starts.bool()
    starts = starts.clone()
    starts[:, 0] = True
    src = real.flatten().nonzero().squeeze(1)
    doc = (torch.arange(B, device=device)[:, None] * (T + 1) + starts.long().cumsum(-1)).flatten()[src]
    _, row = torch.unique(doc, return_inverse=True)
    before = real.long().cumsum(-1) - real.long()  # real tokens before each token, in its row
    base = torch.cummax(torch.where(starts, before, torch.zeros_like(before)), -1).values
    col = (before - base).flatten()[src]
    rows = int(row.max()) + 1 if src.numel() else 1
    length = int(col.max()) + 1 if src.numel() else 1
    target = row * length + col
    mask = torch.zeros(rows * length, dtype=torch.bool, device=device)
    mask[target] = True
    return SequenceRows(src, target, rows, length, mask.view(rows, length))


@dataclasses.dataclass
class AttentionPlan:
    """How every layer attends in one forward, decided once by the backbone."""

    full: bool  # dense attention (``original_full``, or transformers' switch for short inputs)
    key_padding_mask: torch.Tensor | None  # (B, T) over the current tokens
    segment_ids: torch.Tensor | None  # (B, T), packed documents (dense attention)
    rows: SequenceRows | None  # regrouping for the block layout
    compat_plan: bool  # transformers' eval-mode random plan (every random block is block 0)
    zero_padding_queries: bool  # transformers' block-sparse attention outputs zeros at padding queries
    cache: object
    past_len: int
    cache_mask: torch.Tensor | None  # (B, past + T)


class BigBirdSelfAttention(nn.Module):
    """Query, key, value projections, BigBird's block-sparse attention (or dense), and the output projection."""

    def __init__(self, config: ZooBigBirdConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.dropout = config.attention_probs_dropout_prob
        self.pattern = SparsePattern(
            block_size=config.block_size,
            window_blocks=config.window_blocks,
            global_blocks=config.global_blocks,
            random_blocks=config.num_random_blocks,
            causal=config.causal,
            seed=config.random_seed + layer_idx,
        )
        self.dense_pattern = SparsePattern(causal=config.causal)
        self.q_proj = nn.Linear(C, C, bias=config.use_bias)
        self.k_proj = nn.Linear(C, C, bias=config.use_bias)
        self.v_proj = nn.Linear(C, C, bias=config.use_bias)
        self.o_proj = nn.Linear(C, C)

    def forward(self, hidden_states: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        B, T, C = hidden_states.shape
        q, k, v = (
            p(hidden_states).view(B, T, self.num_heads, self.head_dim)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if plan.cache is not None:
            k_all, v_all = plan.cache.update(
                k.transpose(1, 2), v.transpose(1, 2), self.layer_idx
            )  # (B, H, kv, D)
            if plan.past_len > 0:
                return self.o_proj(
                    self._step(q, k_all.transpose(1, 2), v_all.transpose(1, 2), plan).reshape(B, T, C)
                )
        dropout = self.dropout if self.training else 0.0
        if plan.full:
            out = sparse_attention(
                q, k, v, self.dense_pattern, key_padding_mask=plan.key_padding_mask, segment_ids=plan.segment_ids,
                dropout=dropout, backend="naive",
            )  # fmt: skip
        elif plan.rows is not None:
            rows = plan.rows
            out = sparse_attention(
                rows.pack(q),
                rows.pack(k),
                rows.pack(v),
                self.pattern,
                key_padding_mask=rows.mask,
                dropout=dropout,
            )
            out = rows.unpack(out, B, T)
        else:
            random_plan = None
            if plan.compat_plan and self.pattern.random_blocks:
                nb = self.pattern.num_blocks(T)
                random_plan = torch.zeros(
                    1, nb, self.pattern.random_blocks, dtype=torch.long, device=q.device
                )
            out = sparse_attention(
                q,
                k,
                v,
                self.pattern,
                key_padding_mask=plan.key_padding_mask,
                random_plan=random_plan,
                dropout=dropout,
            )
            if plan.zero_padding_queries:
                out = out * plan.key_padding_mask[:, :, None, None].to(out.dtype)
        return self.o_proj(out.reshape(B, T, C))

    def _step(self, q, k, v, plan: AttentionPlan) -> torch.Tensor:
        """Decoding: the new queries against every cached key."""
        mask = plan.cache_mask
        if plan.full:
            return sparse_attention_step(
                q, k, v, self.dense_pattern, past_len=plan.past_len, key_padding_mask=mask
            )
        index = None
        if mask is not None:
            index = (mask.long().cumsum(-1) - 1).clamp(min=0)  # the layout counts real tokens
        return sparse_attention_step(
            q, k, v, self.pattern, past_len=plan.past_len, key_padding_mask=mask,
            q_index=None if index is None else index[:, -q.shape[1]:], k_index=index,
        )  # fmt: skip


class BigBirdLayer(GradientCheckpointingLayer):
    """Post-norm: ``x = norm(x + attn(x))``, then ``x = norm(x + mlp(x))``."""

    def __init__(self, config: ZooBigBirdConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.self_attn = BigBirdSelfAttention(config, layer_idx)
        self.attn_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.up_proj = nn.Linear(C, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.down_proj = nn.Linear(config.intermediate_size, C)
        self.mlp_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, plan):
        hidden_states = self.attn_norm(hidden_states + self.dropout(self.self_attn(hidden_states, plan)))
        mlp = self.down_proj(self.act(self.up_proj(hidden_states)))
        return self.mlp_norm(hidden_states + self.dropout(mlp))


class ZooBigBirdPreTrainedModel(PreTrainedModel):
    config_class = ZooBigBirdConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BigBirdLayer"]
    _skip_keys_device_placement = [CACHE_NAME]


class ZooBigBirdModel(ZooBigBirdPreTrainedModel):
    """Embeddings (token, position, token type; dropout, then LayerNorm, as BigBird orders them) and the layers;
    returns hidden states. With ``config.causal`` the layers attend backwards only and keep a key/value cache."""

    def __init__(self, config: ZooBigBirdConfig):
        super().__init__(config)
        C = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, C)
        self.embed_token_types = nn.Embedding(config.type_vocab_size, C)
        self.embed_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(BigBirdLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _attention_plan(self, inputs, T: int) -> AttentionPlan:
        config = self.config
        compat = config.transformers_compat
        full = config.attention_type == "original_full"
        if compat and not config.causal:
            # transformers' switch: too short for 2 global + 3 window + 2r random blocks
            full = full or T <= (5 + 2 * config.num_random_blocks) * config.block_size
        key_padding_mask = inputs.pad_mask[:, -T:].bool() if inputs.pad_mask is not None else None
        segment_ids = inputs.doc_starts.long().cumsum(-1) if inputs.doc_starts is not None else None
        rows = None
        if (
            not full
            and not compat
            and inputs.past_len == 0
            and (key_padding_mask is not None or segment_ids is not None)
        ):
            real = (
                key_padding_mask
                if key_padding_mask is not None
                else torch.ones_like(segment_ids, dtype=torch.bool)
            )
            rows = sequence_rows(real, inputs.doc_starts)
        return AttentionPlan(
            full=full,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            rows=rows,
            compat_plan=compat and not self.training,
            zero_padding_queries=compat and not full and key_padding_mask is not None,
            cache=inputs.cache,
            past_len=inputs.past_len,
            cache_mask=inputs.pad_mask,
        )

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPast:
        """``attention_mask`` (B, past + T): 1 at real tokens. ``position_ids`` restarting at 0 mark packed
        documents."""
        causal = self.config.causal
        if not causal and (cache is not None or use_cache):
            raise ValueError("ZooBigBirdModel: the bidirectional encoder keeps no cache (use_cache, cache)")
        compat_positions = self.config.transformers_compat and position_ids is None
        inputs = backbone_inputs(
            self,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache if causal else False,
            new_cache=DynamicCache,
            cache_class=DynamicCache,
        )
        B, T, C = inputs.embeds.shape
        positions = inputs.position_ids
        if compat_positions:  # transformers numbers positions by index, padding included
            positions = torch.arange(inputs.past_len, inputs.past_len + T, device=positions.device)[
                None
            ].expand(B, T)
        limit = self.config.max_position_embeddings
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= limit:
            raise ValueError(
                f"position {int(positions.max())} is past the position table (max_position_embeddings={limit}); "
                "extend it with zoo.models.bigbird.extend_position_embeddings"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=inputs.embeds.device)
        embeds = inputs.embeds * C**0.5 if self.config.rescale_embeddings else inputs.embeds
        hidden_states = embeds + self.embed_token_types(token_type_ids) + self.embed_positions(positions)
        hidden_states = self.embed_norm(self.embed_dropout(hidden_states))

        plan = self._attention_plan(inputs, T)
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(hidden_states, plan)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return with_cache(
            BaseModelOutputWithPast, inputs.cache, last_hidden_state=hidden_states, hidden_states=all_hidden
        )


class ZooBigBirdForMaskedLM(MaskedLMHead, ZooBigBirdPreTrainedModel):
    """Masked language modelling through BERT's LM head (:class:`zoo.models.heads.EncoderLMHead`: dense,
    activation, LayerNorm, tied decoder with a bias)."""

    backbone_class = ZooBigBirdModel

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )


class ZooBigBirdForCausalLM(EncoderCausalLMHead, ZooBigBirdPreTrainedModel, GenerationMixin):
    """The causal block-sparse variant: language modelling and ``generate()`` with a key/value cache, through BERT's
    LM head as in the masked model (:class:`zoo.models.heads.EncoderCausalLMHead`)."""

    backbone_class = ZooBigBirdModel


class ZooBigBirdForSequenceClassification(BackboneHead, ZooBigBirdPreTrainedModel):
    """Classifies the first token through dropout, ``dense``, the activation, dropout and ``score`` (transformers'
    ``BigBirdClassificationHead``); the causal variant classifies the last real token instead."""

    def __init__(self, config: ZooBigBirdConfig):
        super().__init__(config)
        C = config.hidden_size
        self.num_labels = config.num_labels
        self.model = ZooBigBirdModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.dense = nn.Linear(C, C)
        self.act = activation(config.hidden_act)
        self.score = nn.Linear(C, config.num_labels)
        self.post_init()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        B, T, _ = h.shape
        if self.config.causal:
            idx = last_token_index(
                B, T, attention_mask=attention_mask, input_ids=input_ids, pad_token_id=self.config.pad_token_id,
                device=h.device,
            )  # fmt: skip
        else:
            idx = torch.zeros(B, dtype=torch.long, device=h.device)
        pooled = h[torch.arange(B, device=h.device), idx]
        logits = self.score(self.dropout(self.act(self.dense(self.dropout(pooled)))))
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class BigBirdQuestionAnsweringHead(nn.Module):
    """BigBird's QA head (transformers' ``BigBirdForQuestionAnsweringHead``): one more post-norm feed-forward block
    over the encoder's output, ``norm(h + down_proj(act(up_proj(dropout(h)))))``, then start and end logits."""

    def __init__(self, config: ZooBigBirdConfig):
        super().__init__()
        C = config.hidden_size
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.up_proj = nn.Linear(C, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.down_proj = nn.Linear(config.intermediate_size, C)
        self.norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.qa_outputs = nn.Linear(C, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.down_proj(self.act(self.up_proj(self.dropout(hidden_states))))
        return self.qa_outputs(self.norm(hidden_states + self.dropout(h)))  # (B, T, 2)


class ZooBigBirdForQuestionAnswering(BackboneHead, ZooBigBirdPreTrainedModel):
    """Extractive QA on BigBird's input layout ``<cls> question <sep> context <sep>``: start and end logits per token
    through :class:`BigBirdQuestionAnsweringHead`. The question (``question_lengths`` tokens, by default up to and
    including the first ``sep_token_id`` of each row) is taken out of the competition: its logits are lowered by
    1e6, all but the first token's (which answers "no answer"); without ``token_type_ids``, the question is type 0
    and the rest type 1. Both as transformers' ``BigBirdForQuestionAnswering`` does."""

    def __init__(self, config: ZooBigBirdConfig):
        super().__init__(config)
        self.model = ZooBigBirdModel(config)
        self.qa_head = BigBirdQuestionAnsweringHead(config)
        self.post_init()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        question_lengths: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> QuestionAnsweringModelOutput:
        """``question_lengths`` (B,) or (B, 1): tokens of each row's question, its ``<cls>`` and ``<sep>``
        included."""
        T = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        if question_lengths is None and input_ids is not None:
            # the first <sep> ends the question (a row without one: argmax 0, only <cls>)
            question_lengths = (input_ids == self.config.sep_token_id).int().argmax(-1) + 1
        question = None
        if question_lengths is not None:
            device = question_lengths.device
            question = torch.arange(T, device=device)[None] < question_lengths.reshape(-1, 1)  # (B, T)
            if token_type_ids is None:
                token_type_ids = (~question).long()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )
        logits = self.qa_head(out.last_hidden_state)
        if question is not None:
            question[:, 0] = False
            logits = logits - question[..., None].to(logits.dtype) * 1e6
        start_logits, end_logits = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = ForQuestionAnsweringLoss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states
        )


def extend_position_embeddings(model: ZooBigBirdPreTrainedModel, new_max: int) -> ZooBigBirdPreTrainedModel:
    """Lengthen the learned position table of a zoo BigBird (any head) to ``new_max`` rows, in place, by copying
    the pretrained one; ``config.max_position_embeddings`` becomes ``new_max``. Its ``L`` learned positions are
    repeated to fill the new rows (Longformer's copy initialisation, Beltagy et al. 2020, section 5); BigBird's table
    has no reserved rows. Outputs at lengths the old table covered are unchanged. Returns ``model``."""
    backbone = model if isinstance(model, ZooBigBirdModel) else getattr(model, "model", None)
    if not isinstance(backbone, ZooBigBirdModel):
        raise ValueError(f"extend_position_embeddings: {type(model).__name__} is not a zoo BigBird model")
    old = backbone.embed_positions
    if not isinstance(new_max, int) or new_max < old.num_embeddings:
        raise ValueError(
            f"extend_position_embeddings: new_max={new_max!r}, expected an integer >= the current "
            f"max_position_embeddings={old.num_embeddings}"
        )
    return interpolate_position_embeddings(model, new_max, mode="copy", offset=0)


__all__ = [
    "ZooBigBirdForCausalLM",
    "ZooBigBirdForMaskedLM",
    "ZooBigBirdForQuestionAnswering",
    "ZooBigBirdForSequenceClassification",
    "ZooBigBirdModel",
    "ZooBigBirdPreTrainedModel",
    "extend_position_embeddings",
]
