"""Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv:2001.04451).

Two residual streams run through reversible layers: ``Y1 = X1 + Attention(X2)``, ``Y2 = X2 + FeedForward(Y1)``.
Since ``X2 = Y2 - FeedForward(Y1)`` and ``X1 = Y1 - Attention(X2)``, the backward (:class:`ReversibleLayers`)
recomputes each layer's inputs from its outputs instead of storing them: training memory does not grow with depth.
Attention is per layer either local (chunks of positions) or LSH (shared query-key, hashed and sorted chunks), both
from ``zoo.ops.lsh_attention``; the feed-forward runs over chunks of positions; positions are axial (two small
tables whose rows are concatenated). The output is the two streams concatenated (``2 * hidden_size`` wide).

Inputs longer than the shortest chunk are padded to a multiple of the chunk lengths (padding is masked), as in
transformers' Reformer, whose ``ReformerModelWithLMHead`` / ``ReformerForMaskedLM`` convert to these classes.
A causal model decodes with a cache of every layer's keys (local) or shared query-keys (LSH) and values. A new
token's local attention reads the last chunks of the cache (O(chunk)); its LSH attention is its row of a forward
over the whole cached sequence, found in O(sequence) work without sorting (``lsh_attention_step``). Local layers
therefore decode exactly as the full forward computes; LSH layers as the forward of each prefix does (in a longer
sequence, later tokens take places in the sorted chunks and change which earlier keys share a chunk).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, MaskedLMOutput

from zoo.models.heads import EncoderCausalLMHead, MaskedLMHead, SequenceClassificationHead
from zoo.models.reformer.configuration_reformer import ZooReformerConfig, default_num_buckets
from zoo.models.utils import CACHE_NAME, backbone_inputs, model_forward, with_cache
from zoo.modules.mlp import activation
from zoo.ops.lsh_attention import hash_buckets, local_attention, lsh_attention, random_rotations
from zoo.ops.lsh_attention.hashing import bucket_factors, rotation_size
from zoo.ops.lsh_attention.step import local_attention_step, lsh_attention_step


def _padded_length(config: ZooReformerConfig, n: int) -> int:
    """Length an input of ``n`` tokens is padded to: a multiple of the chunks' lcm once above the shortest."""
    if n <= min(config.chunk_lengths):
        return n
    m = config.chunk_multiple
    return -(-n // m) * m


def _pad_time(x: torch.Tensor | None, length: int, value=0) -> torch.Tensor | None:
    """x (B, T, ...) padded along time to ``length`` with ``value``."""
    if x is None or x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


class AxialPositionEmbeddings(nn.Module):
    """Position p is ``[rows[p // W], cols[p % W]]`` for an (H, W) grid: H + W rows instead of H * W."""

    def __init__(self, config: ZooReformerConfig):
        super().__init__()
        (h, w), (dr, dc) = config.axial_pos_shape, config.axial_pos_embds_dim
        self.width = w
        self.rows = nn.Parameter(torch.zeros(h, dr))
        self.cols = nn.Parameter(torch.zeros(w, dc))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.rows[position_ids // self.width], self.cols[position_ids % self.width]], dim=-1
        )


class LSHSelfAttention(nn.Module):
    """Shared query-key attention within hashed, sorted chunks (``zoo.ops.lsh_attention.lsh_attention``)."""

    def __init__(self, config: ZooReformerConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, D = config.num_attention_heads, config.attention_head_size
        self.qk_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        if not config.transformers_compat:
            self.register_buffer("rotations", self.draw_rotations(), persistent=True)

    def draw_rotations(self) -> torch.Tensor:
        c = self.config
        return random_rotations(
            c.num_attention_heads,
            c.attention_head_size,
            c.num_hashes,
            c.num_buckets,
            seed=c.hash_seed + self.layer_idx,
        )

    def _rotations(self, like: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not c.transformers_compat:
            return self.rotations.to(like.dtype)
        # transformers draws the same rotations in every layer, seeded afresh, on the activations' device and dtype
        shape = (c.num_attention_heads, c.attention_head_size, c.num_hashes, rotation_size(c.num_buckets))
        gen = None
        if c.hash_seed is not None:
            gen = torch.Generator(device=like.device).manual_seed(c.hash_seed)
        return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)

    def forward(
        self, hidden_states, key_padding_mask, segment_ids, cache, past_len, num_tokens, buckets=None
    ):
        """hidden_states (B, T, C) -> (out (B, T, H*D), buckets or None)."""
        c = self.config
        B, T, _ = hidden_states.shape
        H, D = c.num_attention_heads, c.attention_head_size
        qk = self.qk_proj(hidden_states).view(B, T, H, D)
        v = self.v_proj(hidden_states).view(B, T, H, D)
        if cache is not None and past_len > 0:
            qk_all, v_all = cache.update(qk.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            qk_all, v_all = qk_all.transpose(1, 2), v_all.transpose(1, 2)
            if T == 1 and not (self.training and c.lsh_attention_probs_dropout_prob > 0):
                out = self._decode_step(qk_all, v_all, key_padding_mask)
            else:
                out = self._decode(qk_all, v_all, key_padding_mask, T)
            return out.reshape(B, T, H * D), None
        if cache is not None:  # the tokens given, not the padding to whole chunks
            cache.update(
                qk[:, :num_tokens].transpose(1, 2), v[:, :num_tokens].transpose(1, 2), self.layer_idx
            )
        out, buckets = self._attend(qk, v, key_padding_mask, segment_ids, buckets)
        return out.reshape(B, T, H * D), buckets

    def _num_buckets(self, length: int):
        """The bucket count for an input padded to ``length``."""
        c = self.config
        if c.num_buckets is None and length > c.lsh_attn_chunk_length:
            # transformers' rule for an unset bucket count, written into the config (transformers_compat only)
            c.num_buckets = default_num_buckets(length, c.lsh_attn_chunk_length, c.max_position_embeddings)
        return c.num_buckets if c.num_buckets is not None else 2

    def _attend(self, qk, v, key_padding_mask, segment_ids, buckets=None):
        c = self.config
        T = qk.shape[1]
        num_buckets = self._num_buckets(T)
        kwargs = dict(
            num_buckets=num_buckets,
            chunk_length=c.lsh_attn_chunk_length,
            num_chunks_before=c.lsh_num_chunks_before,
            num_chunks_after=c.lsh_num_chunks_after,
            causal=c.is_decoder,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            dropout=c.lsh_attention_probs_dropout_prob if self.training else 0.0,
        )
        if T <= c.lsh_attn_chunk_length:
            # plain attention: nothing is hashed
            buckets = torch.zeros(qk.shape[0], qk.shape[2], 1, T, dtype=torch.long, device=qk.device)
        elif buckets is None:
            buckets = hash_buckets(qk, self._rotations(qk), num_buckets, key_padding_mask)
        return lsh_attention(qk, v, buckets=buckets, **kwargs), buckets

    def _decode_step(self, qk, v, key_padding_mask):
        """The last token's row as a forward over the whole cached sequence computes it, in O(sequence) work:
        every cached token is hashed (hashing is per token) and the query's window found from bucket counts
        (``lsh_attention_step``), no sorting and no other row's attention."""
        c = self.config
        n = qk.shape[1]
        length = _padded_length(c, n)
        mask = None if key_padding_mask is None else key_padding_mask[:, :n]
        buckets, total = None, 1
        if length > c.lsh_attn_chunk_length:
            num_buckets = self._num_buckets(length)
            buckets = hash_buckets(qk, self._rotations(qk), num_buckets, mask)
            total = math.prod(bucket_factors(num_buckets))
        return lsh_attention_step(
            qk,
            v,
            buckets,
            padded_length=length,
            num_buckets_total=total,
            chunk_length=c.lsh_attn_chunk_length,
            num_chunks_before=c.lsh_num_chunks_before,
            num_chunks_after=c.lsh_num_chunks_after,
            key_padding_mask=mask,
        )

    def _decode(self, qk, v, key_padding_mask, num_new):
        """The rows of the last ``num_new`` tokens, as a forward over the whole cached prefix computes them (several
        new tokens at once: each one's window depends on the others', so the whole prefix is attended)."""
        n = qk.shape[1]
        length = _padded_length(self.config, n)
        mask = key_padding_mask
        if length != n:
            mask = torch.ones(qk.shape[0], n, dtype=torch.bool, device=qk.device) if mask is None else mask
            qk, v, mask = _pad_time(qk, length), _pad_time(v, length), _pad_time(mask.bool(), length, False)
        out, _ = self._attend(qk, v, mask, None)
        return out[:, n - num_new : n]


class LocalSelfAttention(nn.Module):
    """Attention within chunks of positions and their neighbouring chunks (``zoo.ops.lsh_attention``)."""

    def __init__(self, config: ZooReformerConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, D = config.num_attention_heads, config.attention_head_size
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, H * D, bias=False)

    def forward(
        self, hidden_states, key_padding_mask, segment_ids, cache, past_len, num_tokens, buckets=None
    ):
        c = self.config
        B, T, _ = hidden_states.shape
        H, D = c.num_attention_heads, c.attention_head_size
        q, k, v = (p(hidden_states).view(B, T, H, D) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None and past_len > 0:
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            out = local_attention_step(
                q,
                k_all.transpose(1, 2),
                v_all.transpose(1, 2),
                past_length=past_len,
                chunk_length=c.local_attn_chunk_length,
                num_chunks_before=c.local_num_chunks_before,
                key_padding_mask=key_padding_mask,
            )
            return out.reshape(B, T, H * D), None
        if cache is not None:  # the tokens given, not the padding to whole chunks
            cache.update(k[:, :num_tokens].transpose(1, 2), v[:, :num_tokens].transpose(1, 2), self.layer_idx)
        out = local_attention(
            q,
            k,
            v,
            chunk_length=c.local_attn_chunk_length,
            num_chunks_before=c.local_num_chunks_before,
            num_chunks_after=c.local_num_chunks_after,
            causal=c.is_decoder,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            dropout=c.local_attention_probs_dropout_prob if self.training else 0.0,
        )
        return out.reshape(B, T, H * D), None


class ReformerAttentionBlock(nn.Module):
    """f of the reversible layer: LayerNorm, local or LSH attention, output projection."""

    def __init__(self, config: ZooReformerConfig, layer_idx: int):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        kind = config.attn_layers[layer_idx]
        self.attention = (LSHSelfAttention if kind == "lsh" else LocalSelfAttention)(config, layer_idx)
        self.o_proj = nn.Linear(
            config.num_attention_heads * config.attention_head_size, config.hidden_size, bias=False
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, **kwargs):
        out, buckets = self.attention(self.norm(x), **kwargs)
        return self.dropout(self.o_proj(out)), buckets


class ReformerFeedForward(nn.Module):
    """g of the reversible layer: LayerNorm and a two-layer MLP, run over chunks of positions."""

    def __init__(self, config: ZooReformerConfig):
        super().__init__()
        self.chunk_size = config.chunk_size_feed_forward
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.up_proj = nn.Linear(config.hidden_size, config.feed_forward_size)
        self.down_proj = nn.Linear(config.feed_forward_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _chunk(self, x):
        return self.dropout(self.down_proj(self.act(self.dropout(self.up_proj(self.norm(x))))))

    def forward(self, x):
        # not transformers' apply_chunking_to_forward, which refuses lengths that are not a multiple of the chunk
        if self.chunk_size <= 0 or x.shape[1] <= self.chunk_size:
            return self._chunk(x)
        return torch.cat([self._chunk(part) for part in x.split(self.chunk_size, dim=1)], dim=1)


class ReformerLayer(nn.Module):
    """One reversible layer: ``Y1 = X1 + f(X2)``, ``Y2 = X2 + g(Y1)``."""

    def __init__(self, config: ZooReformerConfig, layer_idx: int):
        super().__init__()
        self.attention = ReformerAttentionBlock(config, layer_idx)
        self.feed_forward = ReformerFeedForward(config)

    def forward(self, x1, x2, **kwargs):
        f, buckets = self.attention(x2, **kwargs)
        y1 = x1 + f
        return y1, x2 + self.feed_forward(y1), buckets


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _run_with_rng(state, device, fn, *args, **kwargs):
    """``fn`` with the random state as it was when ``state`` was taken (dropout masks repeat), the current one
    restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        return fn(*args, **kwargs)


class ReversibleLayers(torch.autograd.Function):
    """The layers run without storing activations; the backward rebuilds each layer's inputs from its outputs
    (``X2 = Y2 - g(Y1)``, ``X1 = Y1 - f(X2)``), re-running f and g (same dropout masks, same LSH buckets) to
    backpropagate through them. Parameter gradients are accumulated into ``.grad`` as the backward goes."""

    @staticmethod
    def forward(ctx, x1, x2, layers, kwargs, *params):
        # ``params`` (the layers' trainable weights) are inputs only so that the outputs require grad when the
        # streams do not (frozen embeddings under LoRA); their gradients go straight to ``.grad`` in the backward
        states, all_buckets = [], []
        with torch.no_grad():
            for layer in layers:
                f_state = _rng_state(x2.device)
                f, buckets = layer.attention(x2, **kwargs)
                x1 = x1 + f
                g_state = _rng_state(x2.device)
                x2 = x2 + layer.feed_forward(x1)
                states.append((f_state, g_state))
                all_buckets.append(buckets)
        ctx.layers, ctx.kwargs, ctx.states, ctx.buckets = layers, kwargs, states, all_buckets
        ctx.save_for_backward(x1, x2)
        ctx.num_params = len(params)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        for layer, (f_state, g_state), buckets in zip(
            reversed(ctx.layers), reversed(ctx.states), reversed(ctx.buckets)
        ):
            with torch.enable_grad():
                y1_ = y1.detach().requires_grad_(True)
                g = _run_with_rng(g_state, y1.device, layer.feed_forward, y1_)
                g.backward(dy2)
            with torch.no_grad():
                x2 = y2 - g
                dy1 = dy1 + y1_.grad
            with torch.enable_grad():
                x2_ = x2.detach().requires_grad_(True)
                f, _ = _run_with_rng(f_state, y1.device, layer.attention, x2_, buckets=buckets, **ctx.kwargs)
                f.backward(dy1)
            with torch.no_grad():
                x1 = y1 - f
                dy2 = dy2 + x2_.grad
            y1, y2 = x1, x2
        return (dy1, dy2, None, None) + (None,) * ctx.num_params


@torch.compiler.disable
def _reversible(x1, x2, layers, kwargs):
    """Kept eager under torch.compile: the backward runs f and g itself."""
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    return ReversibleLayers.apply(x1, x2, layers, kwargs, *params)


class ZooReformerPreTrainedModel(PreTrainedModel):
    config_class = ZooReformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ReformerLayer"]
    _skip_keys_device_placement = [CACHE_NAME]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the backbone builds its cache

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, AxialPositionEmbeddings):
            module.rows.normal_(0.0, self.config.axial_norm_std)
            module.cols.normal_(0.0, self.config.axial_norm_std)
        elif isinstance(module, LSHSelfAttention) and hasattr(module, "rotations"):
            module.rotations.copy_(module.draw_rotations())


class ZooReformerModel(ZooReformerPreTrainedModel):
    """Embeddings (token and axial or learned positions) and the reversible layers; returns the two streams
    concatenated and normalised, ``(B, T, 2 * hidden_size)``."""

    def __init__(self, config: ZooReformerConfig):
        super().__init__(config)
        C = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, C)
        if config.axial_pos_embds:
            self.embed_positions = AxialPositionEmbeddings(config)
        else:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, C)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(ReformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(2 * C, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPast:
        """``attention_mask`` (B, past + T): 1 at real tokens. Only a causal model (``is_decoder``) keeps a cache."""
        config = self.config
        if not config.is_decoder and cache is not None:
            raise ValueError("ZooReformerModel: the bidirectional encoder keeps no cache (is_decoder=False)")
        inputs = backbone_inputs(
            self,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache if config.is_decoder else False,
            new_cache=self.new_cache,
            cache_class=DynamicCache,
        )
        B, T, _ = inputs.embeds.shape
        past_len, positions = inputs.past_len, inputs.position_ids
        mask = inputs.pad_mask
        segment_ids = inputs.doc_starts.long().cumsum(-1) if inputs.doc_starts is not None else None
        length = _padded_length(config, T) if past_len == 0 else T
        if length != T:
            # padded to whole chunks: padding positions go on counting, padding keys are masked
            extra = torch.arange(1, length - T + 1, device=positions.device)
            positions = torch.cat([positions, positions[:, -1:] + extra], dim=1)
            mask = torch.ones(B, T, dtype=torch.bool, device=positions.device) if mask is None else mask
            mask = _pad_time(mask.bool(), length, False)
            segment_ids = None if segment_ids is None else _pad_time(segment_ids, length, -1)
        limit = config.max_positions
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= limit:
            raise ValueError(
                f"position {int(positions.max())} is past the {limit} positions the position embeddings cover "
                f"(axial_pos_shape={config.axial_pos_shape} or max_position_embeddings)"
            )
        hidden = _pad_time(self.dropout(inputs.embeds), length) + self.embed_positions(positions)
        kwargs = dict(
            key_padding_mask=mask,
            segment_ids=segment_ids,
            cache=inputs.cache,
            past_len=past_len,
            num_tokens=T,
        )
        all_hidden = () if output_hidden_states else None
        x1 = x2 = hidden
        reversible = (
            config.reversible
            and self.training
            and torch.is_grad_enabled()
            and inputs.cache is None
            and not output_hidden_states
        )
        if reversible:
            x1, x2 = _reversible(x1, x2, tuple(self.layers), kwargs)
        else:
            for layer in self.layers:
                if output_hidden_states:
                    all_hidden += (torch.cat([x1, x2], dim=-1)[:, :T],)
                x1, x2, _ = layer(x1, x2, **kwargs)
        hidden = self.dropout(self.norm(torch.cat([x1, x2], dim=-1)))[:, :T]
        if output_hidden_states:
            all_hidden += (hidden,)
        return with_cache(
            BaseModelOutputWithPast, inputs.cache, last_hidden_state=hidden, hidden_states=all_hidden
        )


class ReformerLMHead(nn.Module):
    """Linear map of the concatenated streams to the vocabulary; tied to the input embedding, it reads the sum of
    the two streams instead (the embedding is ``hidden_size`` wide)."""

    def __init__(self, config: ZooReformerConfig):
        super().__init__()
        self.fold = config.tie_word_embeddings
        width = config.hidden_size if self.fold else 2 * config.hidden_size
        self.decoder = nn.Linear(width, config.vocab_size)

    def forward(self, hidden_states):
        if self.fold:
            a, b = hidden_states.chunk(2, dim=-1)
            hidden_states = a + b
        return self.decoder(hidden_states)


class ZooReformerForCausalLM(EncoderCausalLMHead, ZooReformerPreTrainedModel, GenerationMixin):
    """Causal language model (``is_decoder`` forced on, in a copy of the config that is saved) with a cache."""

    backbone_class = ZooReformerModel
    lm_head_class = ReformerLMHead
    causal_flag = "is_decoder"


class ZooReformerForMaskedLM(MaskedLMHead, ZooReformerPreTrainedModel):
    """Masked language model over the bidirectional encoder."""

    backbone_class = ZooReformerModel
    lm_head_class = ReformerLMHead

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )


class ZooReformerForSequenceClassification(SequenceClassificationHead, ZooReformerPreTrainedModel):
    """Scores the last real token's concatenated streams."""

    backbone_class = ZooReformerModel

    def __init__(self, config: ZooReformerConfig):
        super(SequenceClassificationHead, self).__init__(config)
        self.num_labels = config.num_labels
        self.model = ZooReformerModel(config)
        self.score = nn.Linear(2 * config.hidden_size, config.num_labels, bias=False)
        self.post_init()


__all__ = [
    "ZooReformerForCausalLM",
    "ZooReformerForMaskedLM",
    "ZooReformerForSequenceClassification",
    "ZooReformerModel",
    "ZooReformerPreTrainedModel",
]
