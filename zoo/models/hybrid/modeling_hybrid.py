"""Mamba/attention hybrids: Samba (Ren et al., 2024, arXiv:2406.07522: Mamba + sliding-window attention + MLP) and
Mamba-2-Hybrid (Waleffe et al., 2024, arXiv:2406.07887: mostly Mamba-2, a few attention layers, an MLP after
each; IBM's Bamba is one).

Layer i is a pre-norm block whose mixer ``config.layer_types[i]`` names:

    x = x + mixer(input_layernorm(x))          mixer: zoo's Mamba or Mamba-2 mixer, or zoo.modules.Attention
    x = x + feed_forward(pre_ff_layernorm(x))   only where ``config.mlp_after(i)``: a gated MLP (SwiGLU)

The Mamba mixers are those of ``zoo.models.mamba`` and ``zoo.models.mamba2`` (their ops, ``selective_scan`` and
``retention``, with ``causal_conv1d``); attention is the shared module with rotary positions (partial where
``rope_parameters`` says so, as in Bamba). Weight names follow transformers' ``BambaForCausalLM``
(``model.layers.{i}.{input_layernorm, mamba.*, self_attn.*, pre_ff_layernorm, feed_forward.*}``), except the final
norm, ``model.norm`` (see ``convert_bamba.py``).

Decoding keeps one :class:`HybridCache`: the conv and SSM states of the Mamba layers (fixed size) and the keys and
values of the attention layers, all of them for ``"attention"`` and only the last ``sliding_window - 1`` for
``"sliding_attention"`` (transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer``), so that a Samba-like stack
decodes in time flat in the context. Padding: Mamba layers zero padded positions (as zoo's Mamba does), attention
layers mask them. Packed documents (``position_ids`` restarting at 0) run the Mamba ops with ``cu_seqlens`` and
the attention layers under a document mask, so nothing crosses a document boundary.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.hybrid.configuration_hybrid import ZooHybridConfig
from zoo.models.mamba.modeling_mamba import MambaMixer
from zoo.models.mamba2.modeling_mamba2 import Mamba2Mixer
from zoo.models.utils import CACHE_NAME, BackboneInputs, ZooBackbone
from zoo.modules import Attention, GatedMLP, PackedDocuments, RMSNorm, RotaryEmbedding, build_attention_mask

ATTENTION_TYPES = ("attention", "sliding_attention")


class HybridCache:
    """The decoding state of a hybrid: per Mamba layer a dict of tensors (``get`` / ``set``, as zoo's
    ``RecurrentCache``), per attention layer a transformers key/value cache layer (``update``, as ``DynamicCache``):
    ``DynamicSlidingWindowLayer`` for sliding-window layers, whose size stays bounded, ``DynamicLayer`` otherwise.

    ``seen_tokens`` counts the tokens absorbed (every layer has seen the same ones); the backbone advances it once
    per forward. Batch reordering (beam search) applies to both kinds of layers. After a packed prefill the Mamba
    layers keep each row's last document only, but the attention layers keep every document's keys (as any KV
    cache does): decode from unpacked prompts.
    """

    is_compileable = False

    def __init__(self, layer_types, sliding_window: int | None = None):
        self.layer_types = list(layer_types)
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.kv = {
            i: DynamicSlidingWindowLayer(sliding_window) if kind == "sliding_attention" else DynamicLayer()
            for i, kind in enumerate(self.layer_types)
            if kind in ATTENTION_TYPES
        }
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layer_types)

    def get(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        return self.states.get(layer_idx)

    def set(self, layer_idx: int, **tensors: torch.Tensor) -> None:
        self.states[layer_idx] = dict(tensors)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append the keys and values ``(B, H, T, D)`` of attention layer ``layer_idx``; returns the visible ones."""
        return self.kv[layer_idx].update(key_states, value_states)

    def advance(self, num_tokens: int) -> None:
        """Called once per model forward, after every layer has updated its state."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, *args: Any, **kwargs: Any):
        return self.seen_tokens, 0

    def _map(self, fn) -> None:
        self.states = {i: {n: fn(t) for n, t in s.items()} for i, s in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))
        for layer in self.kv.values():
            if layer.is_initialized:
                layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))
        for layer in self.kv.values():
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])
        for layer in self.kv.values():
            layer.batch_select_indices(indices)


class HybridBlock(GradientCheckpointingLayer):
    """``x + mixer(input_layernorm(x))``, then ``x + feed_forward(pre_ff_layernorm(x))`` where an MLP follows."""

    def __init__(self, config: ZooHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == "mamba":
            self.mamba = MambaMixer(config.mixer_config("mamba"), layer_idx)
        elif self.layer_type == "mamba2":
            self.mamba = Mamba2Mixer(config.mixer_config("mamba2"), layer_idx)
        else:
            self.self_attn = Attention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                layer_idx=layer_idx,
                causal=True,
                sliding_window=config.sliding_window if self.layer_type == "sliding_attention" else None,
                bias=config.attention_bias,
                dropout=config.attention_dropout,
                config=config,
            )
        if config.mlp_after(layer_idx):
            self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.feed_forward = GatedMLP(
                config.hidden_size, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias
            )
        else:
            self.pre_ff_layernorm = self.feed_forward = None

    def forward(self, hidden_states, *, pad_mask=None, docs=None, attention_mask=None, position_embeddings=None,
                cache=None):  # fmt: skip
        """``pad_mask`` (B, T) and ``docs`` for the Mamba mixers (``docs``: rows flattened to one, B = 1);
        ``attention_mask`` and ``position_embeddings`` for attention."""
        B, T, C = hidden_states.shape
        x = self.input_layernorm(hidden_states)
        if self.layer_type in ATTENTION_TYPES:
            x = self.self_attn(
                x, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache
            )
        else:
            if docs is not None:  # the ops take packed documents along time, in one row
                x = x.reshape(1, B * T, C)
                pad_mask = pad_mask.reshape(1, B * T) if pad_mask is not None else None
            x = self.mamba(x, pad_mask, docs, cache).reshape(B, T, C)
        hidden_states = hidden_states + x
        if self.feed_forward is not None:
            hidden_states = hidden_states + self.feed_forward(self.pre_ff_layernorm(hidden_states))
        return hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config_class = ZooHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridCache

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (MambaMixer, Mamba2Mixer)):
            module.init_ssm_weights()


class HybridModel(ZooBackbone, HybridPreTrainedModel):
    cache_class = HybridCache

    def __init__(self, config: ZooHybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = None
        if any(t in ATTENTION_TYPES for t in config.layer_types):
            # The rotated width is given explicitly; the factor is taken out so that no RoPE type applies it twice.
            rope_config = copy.copy(config)
            rope_config.rope_parameters = {
                k: v for k, v in config.rope_parameters.items() if k != "partial_rotary_factor"
            }
            self.rotary_emb = RotaryEmbedding(rope_config, head_dim=config.rotary_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def new_cache(self):
        return HybridCache(self.config.layer_types, self.config.sliding_window)

    def layers_forward(self, inputs: BackboneInputs, output_hidden_states: bool):
        hidden_states, cache = inputs.embeds, inputs.cache
        B, T, _ = hidden_states.shape
        docs = PackedDocuments.from_position_ids(inputs.position_ids) if inputs.packed else None
        pad_mask = inputs.pad_mask[:, -T:] if inputs.pad_mask is not None else None
        position_embeddings, masks = None, {}
        if self.rotary_emb is not None:
            position_embeddings = self.rotary_emb(hidden_states, inputs.position_ids)
            doc_ids = inputs.doc_starts.long().cumsum(-1) if docs is not None else None
            for kind in set(self.config.layer_types) & set(ATTENTION_TYPES):
                masks[kind] = build_attention_mask(
                    batch_size=B,
                    q_len=T,
                    past_len=inputs.past_len,
                    device=hidden_states.device,
                    causal=True,
                    padding_mask=inputs.pad_mask,
                    doc_ids=doc_ids,
                    sliding_window=self.config.sliding_window if kind == "sliding_attention" else None,
                )
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                pad_mask=pad_mask,
                docs=docs,
                attention_mask=masks.get(layer.layer_type),
                position_embeddings=position_embeddings,
                cache=cache,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if cache is not None:
            cache.advance(T)
        return hidden_states, all_hidden


class HybridForCausalLM(CausalLMHead, HybridPreTrainedModel, GenerationMixin):
    backbone_class = HybridModel


class HybridForSequenceClassification(SequenceClassificationHead, HybridPreTrainedModel):
    backbone_class = HybridModel


__all__ = [
    "HybridBlock",
    "HybridCache",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
]
