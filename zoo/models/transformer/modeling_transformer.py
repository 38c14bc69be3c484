"""The baseline transformer of zoo: Llama-style (Touvron et al., 2023, arXiv:2302.13971).

Pre-norm decoder blocks of attention and a SwiGLU feed-forward, rotary positions (or ALiBi, a learned table, or
none), RMSNorm. Every other architecture is measured against it. Weight names match transformers' Llama, so a
``LlamaForCausalLM`` state dict loads unchanged (see ``convert_transformer.py``).
"""

from __future__ import annotations

from torch import nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.transformer.configuration_transformer import TransformerConfig
from zoo.models.utils import CACHE_NAME, BackboneInputs, ZooBackbone
from zoo.modules import Attention, RotaryEmbedding, build_attention_mask, build_mlp, build_norm


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
            config=config,
        )
        self.mlp = build_mlp(config.mlp_type, config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TransformerPreTrainedModel(PreTrainedModel):
    config_class = TransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True


class TransformerModel(ZooBackbone, TransformerPreTrainedModel):
    """Embeddings, blocks and the final norm; returns hidden states."""

    cache_class = Cache

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

    def new_cache(self):
        return DynamicCache(config=self.config)

    def layers_forward(self, inputs: BackboneInputs, output_hidden_states: bool):
        inputs_embeds, position_ids, cache = inputs.embeds, inputs.position_ids, inputs.cache
        B, T, _ = inputs_embeds.shape
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
            past_len=inputs.past_len,
            device=inputs_embeds.device,
            causal=True,
            padding_mask=inputs.pad_mask,
            doc_ids=inputs.doc_starts.long().cumsum(-1) if inputs.doc_starts is not None else None,
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
                cache=cache,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


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
