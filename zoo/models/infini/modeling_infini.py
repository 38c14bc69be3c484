"""Infini-attention (Munkhdalai et al., 2024, "Leave No Context Behind: Efficient Infinite Context Transformers with
Infini-attention", arXiv:2404.07143): a Llama-style decoder whose attention is local to segments of
``segment_length`` tokens and reads a per-head compressive memory of every earlier segment.

Each block is the baseline transformer's (``zoo.models.transformer``: pre-norm, SwiGLU, RMSNorm, the same weight
names), with its attention replaced by :class:`InfiniAttention`:

    1. q, k, v projections, as the baseline's;
    2. A_dot: causal softmax attention inside the segment (rotary positions counted from the segment's start);
    3. A_mem: the memory read σ(q) M / σ(q) z of the un-rotated q, then the segment written into M and z with the
       un-rotated k and v (``zoo.ops.compressive_memory``, linear or delta rule);
    4. out = o_proj(sigmoid(β) A_mem + (1 - sigmoid(β)) A_dot), β one learned scalar per head.

Segments restart at every document (packed ``position_ids`` restarting at 0) and count real tokens only, so that
padding on either side does not move them. Rotary positions restart in every segment: attention never crosses a
segment, and rotary scores depend only on the distance, so this is the baseline's attention inside a segment, and
the positions never grow past ``segment_length`` however long the input.

Decoding keeps, per layer, the memory (M, z) and the keys and values of the current, unfinished segment only; when
a segment fills it is folded into the memory and its keys and values dropped. A long prompt with the cache on runs
in pieces of ``segment_length`` tokens, so its working memory is bounded by the segment, not the prompt; its token
embeddings are looked up piece by piece, and with an int ``logits_to_keep`` (``generate()`` asks for 1) only the
kept positions' hidden states outlive their piece, so that nothing held grows with the prompt but its ids. The
first piece completes the cached unfinished segment, if any, so that every other piece starts on a segment's
first token: without padding or packed documents such a piece is laid out as the training forward is (plain
reshapes, the equal-rows memory op from the cached memory), and only its unfinished last segment is read from the
memory and kept; padded or packed inputs, and pieces inside a segment, gather their segments instead.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.infini.configuration_infini import InfiniConfig
from zoo.models.utils import (
    CACHE_NAME,
    BackboneInputs,
    ZooBackbone,
    backbone_inputs,
    check_input_ids,
    model_forward,
    with_cache,
)
from zoo.modules import Attention, RecurrentCache, RotaryEmbedding, apply_rotary, build_mlp, build_norm
from zoo.modules.attention import DENSE_MASK_KERNELS, attention_function, cpu_float_inputs
from zoo.ops.compressive_memory import compressive_memory, compressive_memory_read
from zoo.ops.compressive_memory.naive import state_dtype


@dataclasses.dataclass
class SegmentLayout:
    """Where the tokens of one forward go, computed once and shared by every layer.

    The "combined" sequence of a row is the cached tokens of its unfinished segment (``past`` columns) followed by
    the new tokens; ``*_token`` indices point into it flattened, (B * (past + T)). ``fast``: no padding, packed
    documents or unfinished cached segment, so that every row's segments start at its first new token and are
    plain reshapes of the new tokens; nothing else is set then but ``cached`` (a cache is read and written: the
    memory starts from the cached one, and the last segment, if unfinished, is kept for the next call instead of
    written).
    """

    local_pos: torch.LongTensor  # (B, T) rotary position of each new token inside its segment
    fast: bool
    cached: bool = False
    past: int = 0
    slot_token: torch.LongTensor | None = None  # (S * L,) token of each slot of the (segments, L) layout
    slot_valid: torch.BoolTensor | None = None  # (S, L)
    token_slot: torch.LongTensor | None = None  # (B * T,) slot of each new token (0 for padding)
    new_real: torch.BoolTensor | None = None  # (B, T)
    mem_token: torch.LongTensor | None = None  # (M,) tokens the memory op takes, packed by document
    cu_seqlens: torch.LongTensor | None = None  # (D + 1,) their documents
    doc_row: torch.LongTensor | None = None  # (D,) the row of each document
    doc_continues: torch.BoolTensor | None = None  # (D,) starts from the row's cached memory
    row_last_doc: torch.LongTensor | None = None  # (B,) -1 for a row without a real token
    tail_token: torch.LongTensor | None = None  # (B, P) tokens of each row's unfinished last segment
    tail_valid: torch.BoolTensor | None = None  # (B, P)


@torch.compiler.disable
def segment_layout(real: torch.BoolTensor, starts: torch.BoolTensor, L: int, past: int, keep_tail: bool):
    """The :class:`SegmentLayout` of a combined sequence: ``real`` (B, C) marks real tokens, ``starts`` (B, C) the
    columns where a packed document starts. With ``keep_tail`` each row's unfinished last segment is left out of
    the memory op (it is read from the memory after the finished ones, and kept for the cache).

    Data-dependent sizes throughout: runs eagerly inside a ``torch.compile``d model."""
    B, C = real.shape
    device = real.device
    counts_so_far = real.long().cumsum(-1)
    first = starts.clone()
    first[:, 0] = True
    base = torch.where(first, counts_so_far - real.long(), 0).cummax(-1).values
    rel = counts_so_far - base - 1  # index of a real token in its document
    seg_start = real & (rel % L == 0)
    real_idx = real.flatten().nonzero().squeeze(1)  # (R,) row-major
    row = real_idx // C
    rel_r = rel.flatten()[real_idx]
    seg_id = seg_start.flatten().long().cumsum(0)[real_idx] - 1
    S = int(seg_start.sum())
    slot = seg_id * L + rel_r % L
    slot_token = torch.zeros(S * L, dtype=torch.long, device=device).index_put((slot,), real_idx)
    slot_valid = torch.zeros(S * L, dtype=torch.bool, device=device).index_put(
        (slot,), torch.ones_like(slot, dtype=torch.bool)
    )
    token_slot = torch.zeros(B * C, dtype=torch.long, device=device).index_put((real_idx,), slot)
    token_slot = token_slot.view(B, C)[:, past:].reshape(-1)

    doc_first = rel_r == 0
    doc_id = doc_first.long().cumsum(0) - 1
    D = int(doc_first.sum())
    per_row = torch.bincount(row, minlength=B)
    has_real = per_row > 0
    last = (per_row.cumsum(0) - 1).clamp(min=0)  # (B,) the row's last real token, where it has one
    row_last_doc = torch.where(has_real, doc_id[last] if len(doc_id) else per_row, -1)
    is_tail = torch.zeros_like(doc_first)
    P = 0
    if keep_tail and len(real_idx):
        unfinished = has_real & (rel_r[last] % L != L - 1)
        is_tail = unfinished[row] & (seg_id == seg_id[last][row])
        P = int((rel_r[is_tail] % L).max()) + 1 if bool(is_tail.any()) else 0
    tail_token = torch.zeros(B, P, dtype=torch.long, device=device)
    tail_valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    if P:
        where = (row[is_tail], rel_r[is_tail] % L)
        tail_token = tail_token.index_put(where, real_idx[is_tail])
        tail_valid = tail_valid.index_put(where, torch.ones_like(where[0], dtype=torch.bool))
    mem = ~is_tail
    lengths = torch.bincount(doc_id[mem], minlength=D)
    flagged = (starts.long().cumsum(-1) > 0).flatten()[real_idx]  # a document start at or before the token
    first_of_row = doc_first & (
        torch.arange(len(real_idx), device=device) == (per_row.cumsum(0) - per_row)[row]
    )
    return SegmentLayout(
        local_pos=(rel % L).clamp(min=0)[:, past:],
        fast=False,
        past=past,
        slot_token=slot_token,
        slot_valid=slot_valid.view(S, L),
        token_slot=token_slot,
        new_real=real[:, past:],
        mem_token=real_idx[mem],
        cu_seqlens=F.pad(lengths.cumsum(0), (1, 0)),
        doc_row=row[doc_first],
        doc_continues=(first_of_row & ~flagged)[doc_first],
        row_last_doc=row_last_doc,
        tail_token=tail_token,
        tail_valid=tail_valid,
    )


class InfiniAttention(Attention):
    """The shared attention's projections, attention kernels and masks, per segment, mixed with a compressive
    memory by a per-head gate ``gate`` (β): ``o_proj(sigmoid(β) A_mem + (1 - sigmoid(β)) A_dot)``."""

    def __init__(self, config: InfiniConfig, layer_idx: int):
        super().__init__(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx=layer_idx,
            causal=True,
            bias=config.attention_bias,
            dropout=config.attention_dropout,
            config=config,
        )
        self.segment_length = config.segment_length
        self.memory_update = config.memory_update
        self.memory_eps = config.memory_eps
        self.gate = nn.Parameter(torch.full((config.num_attention_heads,), float(config.gate_init)))

    def _kernel(self, q, k, v, mask, is_causal: bool):
        """Attention of (N, H, L, D) queries over (N, Hkv, L, D) keys; ``mask`` boolean (N, 1, L, L) or None."""
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        additive = DENSE_MASK_KERNELS.get(impl)
        if additive and mask is None and is_causal:  # the eager kernel applies no causal mask of its own
            L = q.shape[2]
            mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[None, None]
            is_causal = False
        if mask is not None and additive is None:
            raise ValueError(
                f"attn_implementation={impl!r} takes no dense attention mask, and this input needs one (padding, "
                "packed documents or a cache); use 'sdpa' or 'eager'"
            )
        if mask is not None and additive:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask, torch.finfo(q.dtype).min
            )
        dtype = q.dtype
        q, k, v, kernel_dtype = cpu_float_inputs(impl, q, k, v, k.shape[2])
        with kernel_dtype:
            out, _ = attention_function(impl)(
                self,
                q,
                k,
                v,
                mask,
                dropout=self.dropout if self.training else 0.0,
                scaling=self.head_dim**-0.5,
                is_causal=is_causal,
            )
        return out.to(dtype)  # (N, L, H, D)

    def _local_fast(self, q, k, v):
        """Causal attention inside consecutive segments of (B, T, H, D) inputs: a reshape, then the kernel."""
        B, T, H, D = q.shape
        L = min(self.segment_length, T)
        S = -(-T // L)
        pad = S * L - T  # the last segment's padding comes after its tokens: causal attention never sees it
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        # every segment of every row is one entry of the kernel's batch: one call, views of the projections
        q, k, v = (x.reshape(B * S, L, x.shape[2], D).transpose(1, 2) for x in (q, k, v))
        out = self._kernel(q, k, v, None, is_causal=L > 1)
        return out.reshape(B, S * L, H, D)[:, :T]

    def _local(self, q, k, v, layout: SegmentLayout, T: int):
        """Causal attention inside segments gathered from the combined (B, C, H, D) inputs; (B, T, H, D) out."""
        B, C, H, D = q.shape
        S, L = layout.slot_valid.shape
        if T == 1 and S * L > 1:
            return self._local_step(q, k, v, layout)
        q, k, v = (x.reshape(B * C, x.shape[2], D)[layout.slot_token].view(S, L, x.shape[2], D).transpose(1, 2)
                   for x in (q, k, v))  # fmt: skip
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = causal[None, None] & layout.slot_valid[:, None, None, :]  # (S, 1, L, L)
        out = self._kernel(q, k, v, mask, is_causal=False).reshape(S * L, H, D)
        out = out[layout.token_slot].view(B, T, H, D)
        return out * layout.new_real[..., None, None].to(out.dtype)

    def _local_step(self, q, k, v, layout: SegmentLayout):
        """``_local`` for one new token per row (decoding): only its query, over the keys of its own segment up to
        it, instead of every query of the segment (which a step would recompute and drop)."""
        B, C, H, D = q.shape
        S, L = layout.slot_valid.shape
        slot = layout.token_slot  # (B,): each new token's slot, segment * L + position
        seg, pos = slot // L, slot % L
        flat = layout.slot_token.view(S, L)[seg]  # (B, L): the tokens of each new token's segment
        k_seg, v_seg = (x.reshape(B * C, x.shape[2], D)[flat].transpose(1, 2) for x in (k, v))  # (B, Hkv, L, D)
        q_new = q.reshape(B * C, H, D)[layout.slot_token[slot]][:, :, None]  # (B, H, 1, D)
        mask = layout.slot_valid[seg] & (torch.arange(L, device=q.device)[None] <= pos[:, None])  # (B, L)
        out = self._kernel(q_new, k_seg, v_seg, mask[:, None, None, :], is_causal=False)  # (B, 1, H, D)
        return out * layout.new_real[..., None, None].to(out.dtype)

    def _memory(self, q, k, v, layout: SegmentLayout, state: torch.Tensor | None):
        """The memory read of the new tokens from the combined (B, C, H, D) inputs, and each row's memory after
        its finished segments (for the cache)."""
        B, C, H, D = q.shape
        flat = [x.reshape(B * C, x.shape[2], x.shape[3]) for x in (q, k, v)]
        qm, km, vm = (x[layout.mem_token][None] for x in flat)  # (1, M, H, D)
        docs = len(layout.doc_row)
        init_state = None
        if state is not None and docs:
            keep = layout.doc_continues[:, None, None, None]
            init_state = torch.where(keep, state[layout.doc_row], torch.zeros_like(state[layout.doc_row]))
        read, final = compressive_memory(
            qm, km, vm,
            segment_length=self.segment_length,
            update=self.memory_update,
            eps=self.memory_eps,
            initial_state=init_state,
            output_final_state=True,
            cu_seqlens=layout.cu_seqlens,
        )  # fmt: skip
        out = read.new_zeros(B * C, H, read.shape[-1]).index_put((layout.mem_token,), read[0])
        new_state = state
        if new_state is None:
            new_state = final.new_zeros(B, H, D, v.shape[-1] + 1)
        has = layout.row_last_doc >= 0
        if docs:
            last_state = final[layout.row_last_doc.clamp(min=0)]
            new_state = torch.where(has[:, None, None, None], last_state, new_state)
        if layout.tail_token.shape[1]:
            tail_q = flat[0][layout.tail_token]  # (B, P, H, D)
            tail_read = compressive_memory_read(tail_q, new_state, eps=self.memory_eps).to(out.dtype)
            valid = layout.tail_valid
            out = out.index_put((layout.tail_token[valid],), tail_read[valid])
        return out.view(B, C, H, -1)[:, layout.past :], new_state

    def _memory_fast_cached(self, q, k_mem, v_mem, k_rot, k, v, cache):
        """The memory read of (B, T, H, D) new tokens whose segments all start at the first one (``layout.fast``
        with a cache): the finished segments through the equal-rows op from the cached memory, the unfinished last
        one read from the memory after them; the cache then holds that memory and the unfinished segment's keys
        and values (``k_rot``, ``k``, ``v``: (B, T, Hkv, D))."""
        B, T, H, _ = q.shape
        L = self.segment_length
        past = cache.get(self.layer_idx)
        state = None if past is None else past["state"]
        done = T - T % L  # tokens of the finished segments
        reads = []
        if done:
            read, state = compressive_memory(
                q[:, :done],
                k_mem[:, :done],
                v_mem[:, :done],
                segment_length=L,
                update=self.memory_update,
                eps=self.memory_eps,
                initial_state=state,
                output_final_state=True,
            )
            reads.append(read)
        if state is None:  # nothing written yet: the empty memory, whose read is exactly zero
            state = q.new_zeros(B, H, q.shape[-1], v_mem.shape[-1] + 1, dtype=state_dtype(q.dtype))
        if done < T:
            reads.append(compressive_memory_read(q[:, done:], state, eps=self.memory_eps).to(v_mem.dtype))
        kept = (("keys", k_rot), ("mem_keys", k), ("values", v))
        tail = {name: x[:, done:].contiguous() for name, x in kept}
        real = torch.ones(B, T - done, dtype=torch.bool, device=q.device)
        cache.set(self.layer_idx, state=state, real=real, **tail)
        return reads[0] if len(reads) == 1 else torch.cat(reads, 1)

    def forward(self, hidden_states, *, layout: SegmentLayout, position_embeddings=None, cache=None):
        B, T, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        # 1. projections
        q = self.q_proj(hidden_states).view(B, T, H, D)
        k = self.k_proj(hidden_states).view(B, T, Hkv, D)
        v = self.v_proj(hidden_states).view(B, T, Hkv, D)
        q_rot, k_rot = q, k
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = H // Hkv
        if layout.fast:
            # 2. local attention, 3. memory (a key/value head writes the memory of each query head it serves)
            local = self._local_fast(q_rot, k_rot, v)
            k_mem, v_mem = (x.repeat_interleave(groups, dim=2) if groups > 1 else x for x in (k, v))
            if layout.cached:
                memory = self._memory_fast_cached(q, k_mem, v_mem, k_rot, k, v, cache)
            else:
                memory, _ = compressive_memory(
                    q,
                    k_mem,
                    v_mem,
                    segment_length=self.segment_length,
                    update=self.memory_update,
                    eps=self.memory_eps,
                )
        else:
            past = cache.get(self.layer_idx) if cache is not None else None
            state = None
            if past is not None:  # the unfinished segment's tokens come first
                state = past["state"]
                k_rot, k, v = (
                    torch.cat([past[n], x], 1) for n, x in (("keys", k_rot), ("mem_keys", k), ("values", v))
                )
                q_rot, q = (F.pad(x, (0, 0, 0, 0, layout.past, 0)) for x in (q_rot, q))
            local = self._local(q_rot, k_rot, v, layout, T)
            k_mem, v_mem = (x.repeat_interleave(groups, dim=2) if groups > 1 else x for x in (k, v))
            memory, state = self._memory(q, k_mem, v_mem, layout, state)
            if cache is not None:
                tail = {}
                for name, x in (("keys", k_rot), ("mem_keys", k), ("values", v)):
                    kept = x.reshape(-1, Hkv, D)[layout.tail_token]  # (B, P, Hkv, D)
                    tail[name] = kept * layout.tail_valid[..., None, None].to(kept.dtype)
                cache.set(self.layer_idx, state=state, real=layout.tail_valid, **tail)
        # 4. the gate mixes the two per head
        g = torch.sigmoid(self.gate).to(local.dtype)[:, None]  # (H, 1)
        out = torch.lerp(local, memory.to(local.dtype), g)  # g A_mem + (1 - g) A_dot, in one pass
        return self.o_proj(out.reshape(B, T, H * D))


class InfiniBlock(GradientCheckpointingLayer):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``, as the baseline transformer's block."""

    def __init__(self, config: InfiniConfig, layer_idx: int):
        super().__init__()
        self.self_attn = InfiniAttention(config, layer_idx)
        self.mlp = build_mlp(config.mlp_type, config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, layout: SegmentLayout, position_embeddings=None, cache=None):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states),
            layout=layout,
            position_embeddings=position_embeddings,
            cache=cache,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class InfiniPreTrainedModel(PreTrainedModel):
    config_class = InfiniConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InfiniBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own RecurrentCache: memory plus the current segment's keys

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, InfiniAttention):
            init.constant_(module.gate, float(self.config.gate_init))


class InfiniModel(ZooBackbone, InfiniPreTrainedModel):
    """Embeddings, blocks and the final norm; returns hidden states."""

    cache_class = RecurrentCache

    def __init__(self, config: InfiniConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InfiniBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def new_cache(self):
        return RecurrentCache(self.config.num_hidden_layers)

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
        keep_last: int = 0,
    ) -> BaseModelOutputWithPast:
        """The shared backbone forward (``ZooBackbone``), with ``keep_last`` > 0 returning the hidden states of
        the last ``keep_last`` positions only (what the language-model head needs for an int ``logits_to_keep``).
        Token embeddings are looked up per piece of a long cached input, and with ``keep_last`` the hidden states
        of the other pieces are dropped as each finishes: a streaming prefill then holds nothing that grows with
        the input but the ids themselves."""
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps every position), got {keep_last}")
        embed_later = input_ids is not None and inputs_embeds is None
        if embed_later:
            check_input_ids(input_ids, self.config.vocab_size)
            # a zero-width stand-in carries the shape: layers_forward embeds the ids piece by piece
            inputs_embeds = self.embed_tokens.weight.new_empty((*input_ids.shape, 0))
        inputs = backbone_inputs(
            self,
            input_ids=None if embed_later else input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            new_cache=self.new_cache,
            cache_class=self.cache_class,
        )
        T = inputs.embeds.shape[1]
        hidden_states, all_hidden = self.layers_forward(
            inputs,
            bool(output_hidden_states),
            input_ids=input_ids if embed_later else None,
            keep_last=keep_last,
        )
        if inputs.cache is not None:
            inputs.cache.advance(T)
        return with_cache(
            BaseModelOutputWithPast, inputs.cache, last_hidden_state=hidden_states, hidden_states=all_hidden
        )

    def layers_forward(
        self,
        inputs: BackboneInputs,
        output_hidden_states: bool,
        input_ids: torch.LongTensor | None = None,
        keep_last: int = 0,
    ):
        """Blocks and final norm over ``inputs``; ``input_ids``: the ids to embed when ``inputs.embeds`` is the
        zero-width stand-in; ``keep_last`` > 0: the hidden states of the last ``keep_last`` positions only."""
        T = inputs.embeds.shape[1]
        L = self.config.segment_length
        first_kept = max(T - keep_last, 0) if keep_last > 0 else 0

        def piece_inputs(start: int, stop: int) -> BackboneInputs:
            if input_ids is not None:
                embeds = self.embed_tokens(input_ids[:, start:stop])
            else:
                embeds = inputs.embeds[:, start:stop]
            if (start, stop) == (0, T):
                return dataclasses.replace(inputs, embeds=embeds)
            return dataclasses.replace(
                inputs,
                embeds=embeds,
                past_len=inputs.past_len + start,
                position_ids=inputs.position_ids[:, start:stop],
                pad_mask=None if inputs.pad_mask is None else inputs.pad_mask[:, : inputs.past_len + stop],
                doc_starts=None if inputs.doc_starts is None else inputs.doc_starts[:, start:stop],
            )

        # with a cache, a long input runs in pieces of one segment: the working memory stays bounded by it, and
        # only the kept positions' hidden states outlive their piece. The first piece completes the cached
        # unfinished segment, so that the others start on a segment's first token (the fast layout, where
        # nothing else stops it).
        past = inputs.cache.get(0) if inputs.cache is not None else None
        first = L - past["real"].shape[1] if past is not None and past["real"].shape[1] else L
        if inputs.cache is None or T <= first:
            hidden, all_hidden = self._segments_forward(piece_inputs(0, T), output_hidden_states)
            return hidden[:, first_kept:], all_hidden
        hidden, all_hidden = [], None
        for start in (0, *range(first, T, L)):
            stop = min(start + L if start else first, T)
            h, piece_hidden = self._segments_forward(piece_inputs(start, stop), output_hidden_states)
            if stop > first_kept:
                hidden.append(h[:, max(first_kept - start, 0) :])
            if piece_hidden is not None:
                all_hidden = [piece_hidden] if all_hidden is None else [*all_hidden, piece_hidden]
        if all_hidden is not None:
            all_hidden = tuple(torch.cat(parts, 1) for parts in zip(*all_hidden))
        return torch.cat(hidden, 1), all_hidden

    def _layout(self, inputs: BackboneInputs) -> SegmentLayout:
        B, T, _ = inputs.embeds.shape
        L = self.config.segment_length
        device = inputs.embeds.device
        cache = inputs.cache
        past = cache.get(0) if cache is not None else None
        if self._segments_start_here(inputs, past):
            local_pos = (torch.arange(T, device=device) % L)[None].expand(B, T)
            return SegmentLayout(local_pos=local_pos, fast=True, cached=cache is not None)
        new_real = torch.ones(B, T, dtype=torch.bool, device=device)
        if inputs.pad_mask is not None:
            new_real = inputs.pad_mask[:, -T:].to(device=device, dtype=torch.bool)
        past_real = past["real"] if past is not None else new_real[:, :0]
        starts = torch.zeros(B, T, dtype=torch.bool, device=device)
        if inputs.doc_starts is not None:
            starts = inputs.doc_starts.to(device)
        real = torch.cat([past_real, new_real], 1)
        starts = torch.cat([torch.zeros_like(past_real), starts], 1)
        return segment_layout(real, starts, L, past_real.shape[1], keep_tail=cache is not None)

    @staticmethod
    def _segments_start_here(inputs: BackboneInputs, past: dict | None) -> bool:
        """Whether every row's segments start at its first new token and run over all of them (the fast layout):
        no padding, one document per row (or, with a cache, a document that goes on from it), and no unfinished
        segment in the cache."""
        if inputs.pad_mask is not None:
            return False
        if past is not None and past["real"].shape[1]:
            return False
        starts = inputs.doc_starts
        # position_ids restarting inside the input (or at its start, after cached tokens) mark documents that
        # must not read the memory before them
        return starts is None or not bool(starts[:, 1:].any() or (past is not None and starts[:, 0].any()))

    def _segments_forward(self, inputs: BackboneInputs, output_hidden_states: bool):
        layout = self._layout(inputs)
        hidden_states = inputs.embeds
        position_embeddings = None
        if self.rotary_emb is not None:
            position_embeddings = self.rotary_emb(hidden_states, layout.local_pos)
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(
                hidden_states, layout, position_embeddings=position_embeddings, cache=inputs.cache
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class InfiniForCausalLM(CausalLMHead, InfiniPreTrainedModel, GenerationMixin):
    backbone_class = InfiniModel
    backbone_keeps_last = True  # an int logits_to_keep bounds the prefill's memory (InfiniModel's keep_last)

    @classmethod
    def from_baseline(
        cls, path_or_model, *, gate_init: float = -10.0, **config_overrides
    ) -> InfiniForCausalLM:
        """An Infini-attention model initialised from a zoo baseline transformer (``zoo_transformer``: a
        ``TransformerForCausalLM`` or a path to one), as the paper starts from a pretrained model: the same
        embeddings, attention, MLP and norm weights, and every gate at ``gate_init`` so that the model starts as
        the baseline's attention local to segments (sigmoid(-10) = 4.5e-5 of the memory read). Inputs shorter
        than one segment then give the baseline's logits, up to that factor. ``config_overrides``:
        ``segment_length``, ``memory_update``, ... (the baseline's ``max_position_embeddings`` is the default
        segment length)."""
        from zoo.models.transformer import TransformerConfig, TransformerForCausalLM

        baseline = path_or_model
        if not isinstance(baseline, nn.Module):
            baseline = TransformerForCausalLM.from_pretrained(path_or_model)
        base = baseline.config
        if not isinstance(base, TransformerConfig):
            raise ValueError(
                f"from_baseline: expected a zoo baseline transformer (model_type 'zoo_transformer'), got "
                f"model_type {getattr(base, 'model_type', None)!r}"
            )
        if base.position_embedding_type not in ("rope", "none") or base.sliding_window is not None:
            raise ValueError(
                "from_baseline: the baseline must use rotary or no positions and full attention, got "
                f"position_embedding_type={base.position_embedding_type!r}, sliding_window={base.sliding_window!r}"
            )
        shared = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "mlp_type", "norm_type", "rms_norm_eps",
            "max_position_embeddings", "position_embedding_type", "attention_bias", "attention_dropout",
            "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
        )  # fmt: skip
        kwargs = {name: getattr(base, name) for name in shared}
        kwargs["rope_parameters"] = dict(base.rope_parameters) if base.rope_parameters else None
        kwargs["segment_length"] = base.max_position_embeddings
        kwargs.update(config_overrides, gate_init=gate_init)
        model = cls(InfiniConfig(**kwargs))
        missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
        not_gates = [name for name in missing if not name.endswith("self_attn.gate")]
        if not_gates or unexpected:
            raise ValueError(
                f"from_baseline: weights do not match: missing {not_gates}, unexpected {unexpected}"
            )
        return model.to(next(baseline.parameters()).dtype)


class InfiniForSequenceClassification(SequenceClassificationHead, InfiniPreTrainedModel):
    backbone_class = InfiniModel


__all__ = [
    "InfiniAttention",
    "InfiniBlock",
    "InfiniForCausalLM",
    "InfiniForSequenceClassification",
    "InfiniModel",
    "InfiniPreTrainedModel",
    "SegmentLayout",
]
