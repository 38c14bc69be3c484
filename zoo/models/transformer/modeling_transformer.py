"""The baseline transformer of zoo: Llama-style (Touvron et al., 2023, arXiv:2302.13971).

Pre-norm decoder blocks of attention and a SwiGLU feed-forward, rotary positions (or ALiBi, a learned table, or
none), RMSNorm. Every other architecture is measured against it. Weight names match transformers' Llama, so a
``LlamaForCausalLM`` state dict loads unchanged (see ``convert_transformer.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
)

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.transformer.configuration_transformer import TransformerConfig
from zoo.models.utils import default_position_ids, embed_inputs, resolve_use_cache
from zoo.modules import Attention, RotaryEmbedding, build_attention_mask, build_mlp, build_norm, document_ids


class TransformerBlock(GradientCheckpointingLayer):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: TransformerConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx=layer_idx,
            causal=True,
            sliding_window=config.sliding_window,
            bias=config.attention_bias,
            dropout=config.attention_dropout,
            alibi=config.position_embedding_type == "alibi",
        )
        self.mlp = build_mlp(config.mlp_type, config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TransformerPreTrainedModel(PreTrainedModel):
    config_class = TransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True


class TransformerModel(TransformerPreTrainedModel):
    """Embeddings, blocks and the final norm; returns hidden states."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        inputs_embeds = embed_inputs(self, input_ids, inputs_embeds)
        B, T, _ = inputs_embeds.shape
        use_cache = resolve_use_cache(self, use_cache)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0

        # Packed documents are recognised by position ids that restart at 0; without explicit ids, positions
        # count real tokens so that left padding does not shift them.
        doc_ids = None
        if position_ids is not None and past_len == 0 and T > 1:
            doc_ids = document_ids(position_ids)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_len, B, T, inputs_embeds.device)

        if self.config.position_embedding_type == "learned":
            limit = self.config.max_position_embeddings
            if int(position_ids.max()) >= limit:
                raise ValueError(
                    f"position {int(position_ids.max())} is past max_position_embeddings={limit} of the learned "
                    "position table; extend it with zoo.positional.interpolate_position_embeddings"
                )
            inputs_embeds = inputs_embeds + self.embed_positions(position_ids)
        position_embeddings = (
            self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None
        )

        mask = build_attention_mask(
            batch_size=B,
            q_len=T,
            past_len=past_len,
            device=inputs_embeds.device,
            causal=True,
            padding_mask=attention_mask,
            doc_ids=doc_ids,
            sliding_window=self.config.sliding_window,
        )
        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                past_key_values=past_key_values,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden,
        )


class TransformerForCausalLM(CausalLMHead, TransformerPreTrainedModel, GenerationMixin):
    backbone_class = TransformerModel


class TransformerForSequenceClassification(SequenceClassificationHead, TransformerPreTrainedModel):
    backbone_class = TransformerModel


__all__ = [
    "TransformerForCausalLM",
    "TransformerForSequenceClassification",
    "TransformerModel",
    "TransformerPreTrainedModel",
]
