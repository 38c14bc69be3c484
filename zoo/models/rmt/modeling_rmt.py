"""Recurrent Memory Transformer (Bulatov et al., 2022, "Recurrent Memory Transformer", arXiv:2207.06881; Bulatov
et al., 2023, "Scaling Transformer to 1M tokens and beyond with RMT", arXiv:2304.11062).

A wrapper over any causal LM (the backbone). A long input is cut into segments; each segment is processed as
``[memory, segment, memory]``: every token reads the memory placed before it, and the memory tokens placed after
it attend to the whole segment, so their final hidden states are the memory the next segment reads. The loss
spans all segments (the logits of all segments, concatenated, shifted once).

Conventions follow the authors' ``RecurrentWrapper`` / ``MemoryCell`` (``booydar/recurrent-memory-transformer``,
``modeling_rmt/language_modeling.py``) so that their checkpoints load (:meth:`RMTForCausalLM.from_booydar`) and
give the same logits: memory initialised as ``randn * std(input embeddings)``; the same memory tensor is placed
at the read and write positions; memory positions count in the attention mask as ones; the backbone is called
on ``inputs_embeds`` and numbers positions itself within each segment; the new memory is the last entry of the
backbone's ``hidden_states``. Where zoo differs:

- ``bptt_depth`` really truncates. The authors' ``manage_gradients`` rebinds a local name to the detached memory
  and returns, so their ``k2`` setting never cuts the graph. Here the memory written by a segment more than
  ``bptt_depth`` segments before the last one is detached.
- Left and right segment alignment are counted from each row's own real tokens (leading padding is moved to the
  end for left alignment, trailing padding to the front for right alignment), and a row whose segment holds no
  real token keeps its memory; so a padded batch gives every row what it gives alone. On right-padded input
  with left alignment (the authors' default) the logits of the real tokens are theirs.
- Decoding extends the last segment token by token with the backbone's cache and, when the segment fills, writes
  memory and opens a new one (the authors' ``generate`` stays in the last segment); the logits equal those of a
  full forward over the same tokens. A batch of left-padded prompts of
  different lengths decodes row by row, each row's real tokens through its own cache, so that every row gives
  what it gives alone (its segment boundaries are its own).
- Center alignment cuts a padded row by its own real length (each such row processed alone), so that padding
  never changes a row's segments there either.
- Packed documents (``position_ids`` restarting at 0) are processed one by one, each from the initial memory.
- Two settings (off by default, so the authors' memory is the default) change what the memory is:
  ``memory_source="residual"`` hands on the residual stream entering the backbone's final norm instead of the
  normed last hidden states (the memory read plus what the layers added at the write positions, so the memory
  travels along the backbone's identity path and a segment that adds nothing keeps it whole), and
  ``memory_update="gated"`` mixes the memory read and the one written through learned per-channel gates
  (``memory_gate_bias`` sets how open they start). The passkey recipe (``configs/rmt/passkey.yaml``) uses both:
  there the memory learns to carry the key over 4 segments in a fraction of the steps the authors' memory needs,
  and the gates learn to stay nearly shut on filler, so that a key written in the first segment is still read
  after 31 segments of filler (``model_cards/rmt.md`` has the numbers).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from zoo.models.heads import classify_last_token
from zoo.models.rmt.configuration_rmt import RMTConfig
from zoo.models.utils import (
    CACHE_NAME,
    check_input_ids,
    model_forward,
    output_cache,
    resolve_use_cache,
    with_cache,
)
from zoo.modules.documents import document_starts, has_several_documents

# where the final norm of a pre-norm backbone lives on its base model (zoo and Llama-style; GPT-2; OPT; Mamba)
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f")


@dataclass
class RMTModelOutput(BaseModelOutputWithPast):
    """``last_hidden_state`` and ``logits`` (the backbone's) over the input tokens; ``memory_state`` (B, M, C)
    the memory after the last segment (None while a decoding cache holds a segment open)."""

    logits: torch.FloatTensor | None = None
    memory_state: torch.FloatTensor | None = None


@dataclass
class RMTCausalLMOutput(CausalLMOutputWithPast):
    memory_state: torch.FloatTensor | None = None


class RMTCache:
    """Decoding state: the memory the open segment reads, the backbone's cache over ``[memory, tokens so far]``
    of that segment, and its attention mask. Its size is bounded by one segment, whatever the input length.

    Prompts with left padding of different lengths have segment boundaries at different places in each row, so
    such a batch keeps one single-row cache per row (``rows``), each fed its row's real tokens only."""

    is_compileable = False

    def __init__(self, memory: torch.Tensor | None):
        self.memory = memory  # (B, M, C) or None without memory tokens
        self.backbone_cache = None
        self.mask: torch.Tensor | None = None  # (B, M + open_len) over the open segment
        self.open_len = 0  # tokens in the open segment
        self.seen_tokens = 0  # positions of the batch seen, padding included
        self.rows: list[RMTCache] | None = None

    def split_rows(self, batch_size: int) -> None:
        """One cache per row from here on (only before the first token)."""
        memory = self.memory
        self.rows = [RMTCache(None if memory is None else memory[b : b + 1]) for b in range(batch_size)]
        self.memory = None

    def _select_rows(self, indices: list[int]) -> None:
        # a row picked twice (beam search) gets its own copy: each is extended in place by its own tokens
        seen: set[int] = set()
        picked = []
        for i in indices:
            picked.append(copy.deepcopy(self.rows[i]) if i in seen else self.rows[i])
            seen.add(i)
        self.rows = picked

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, *args, **kwargs):
        return self.seen_tokens, 0

    def _map(self, fn, method: str, *args) -> None:
        if self.memory is not None:
            self.memory = fn(self.memory)
        if self.mask is not None:
            self.mask = fn(self.mask)
        if self.backbone_cache is not None:
            getattr(self.backbone_cache, method)(*args)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.rows is not None:
            return self._select_rows(beam_idx.tolist())
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)), "reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is not None:
            return self._select_rows([i for i in range(len(self.rows)) for _ in range(repeats)])
        self._map(lambda t: t.repeat_interleave(repeats, dim=0), "batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows is not None:
            return self._select_rows(torch.arange(len(self.rows))[indices.cpu()].tolist())
        self._map(lambda t: t[indices], "batch_select_indices", indices)


def segment_bounds(length: int, segment_length: int, alignment: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each segment of a sequence of ``length`` tokens (the authors' ``split_tensor``)."""
    if length == 0:
        return []
    if alignment == "left":
        starts = list(range(0, length, segment_length))
    elif alignment == "right":
        starts = sorted({max(0, e - segment_length) for e in range(length, 0, -segment_length)})
    elif alignment == "center":
        size = math.ceil(length / math.ceil(length / segment_length))
        starts = list(range(0, length, size))
    else:
        raise ValueError(f"segment_alignment={alignment!r}; expected 'left', 'right' or 'center'")
    return list(zip(starts, starts[1:] + [length]))


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of ``x`` (B, T, ...) moved left by ``shift[b]`` places, cyclically."""
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device)[None] + shift[:, None]) % T  # (B, T)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


def _place_row(out, b, idx, shape, logits, hidden, all_hidden, with_hidden):
    """Write a one-row output ``out`` (its tokens at positions ``idx`` of row ``b``) into the batch's ``logits``,
    ``hidden`` and ``all_hidden`` of ``shape`` (B, T), allocated zero-filled at the first row."""
    if logits is None:
        logits = out.logits.new_zeros(*shape, out.logits.shape[-1])
        hidden = out.last_hidden_state.new_zeros(*shape, out.last_hidden_state.shape[-1])
        if with_hidden:
            all_hidden = tuple(h.new_zeros(*shape, h.shape[-1]) for h in out.hidden_states)
    logits[b, idx], hidden[b, idx] = out.logits[0], out.last_hidden_state[0]
    if with_hidden:
        for full, h in zip(all_hidden, out.hidden_states):
            full[b, idx] = h[0]
    return logits, hidden, all_hidden


def _several_documents(position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> bool:
    """Whether ``position_ids`` restart at 0 inside a row's real tokens (packed documents). Padding is no
    document: ``generate()`` numbers left-padded prompts ``0, 0, 0, 0, 1, 2``, one document after its padding."""
    if mask is None or not has_several_documents(position_ids):
        return has_several_documents(position_ids)
    real = mask.bool()
    first = real & (real.long().cumsum(-1) == 1)
    return bool(((position_ids == 0) & real & ~first).any())


class RMTPreTrainedModel(PreTrainedModel):
    config_class = RMTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _is_stateful = True
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own RMTCache, which holds the backbone's cache inside.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RMTModel) and module.memory is not None:
            std = getattr(self.config.backbone, "initializer_range", 0.02)
            module.memory.normal_(0.0, std)
            if module.memory_gate is not None:  # gates start near sigmoid(memory_gate_bias) whatever is written
                module.memory_gate.weight.normal_(0.0, std)
                module.memory_gate.bias.fill_(self.config.memory_gate_bias)


class RMTModel(RMTPreTrainedModel):
    """The memory tokens and the segment loop over ``backbone``, a causal LM; returns its logits and last hidden
    states over the input tokens, and the memory."""

    def __init__(self, config: RMTConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = (
            backbone if backbone is not None else AutoModelForCausalLM.from_config(config.backbone)
        )
        width = self.backbone.get_input_embeddings().weight.shape[1]
        M = config.num_mem_tokens
        self.memory = nn.Parameter(torch.zeros(M, width)) if M > 0 else None
        if config.memory_source == "residual":
            self._final_norm()  # a clear error now rather than at the first forward
        # memory_update="gated": a gate per memory token and channel, from what the write token holds
        self.memory_gate = nn.Linear(width, width) if config.memory_update == "gated" and M > 0 else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def initial_memory(self, batch_size: int) -> torch.Tensor | None:
        if self.memory is None:
            return None
        return self.memory[None].expand(batch_size, -1, -1)

    def _update(self, memory: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """The next memory from the one read and what the write tokens hold: ``written`` itself (``"replace"``),
        or with ``memory_update="gated"`` the convex mix ``memory + g * (written - memory)``, ``g = sigmoid(W
        written + b)``, so that a gate near 0 keeps the memory as it is."""
        if written.shape[-1] != memory.shape[-1]:
            # Reformer's last hidden states, for one, hold its two reversible streams side by side
            residual = self.config.memory_source == "residual"
            where = "the input of its final norm is" if residual else "its last hidden states are"
            raise ValueError(
                f"RMT over {type(self.backbone).__name__}: {where} {written.shape[-1]} wide, not the "
                f"memory's {memory.shape[-1]}, so they cannot be written back as memory tokens; this backbone "
                f"cannot carry RMT memory with memory_source={self.config.memory_source!r} (num_mem_tokens=0 works)"
            )
        if self.memory_gate is None:
            return written
        memory = memory.to(written.dtype)
        return memory + torch.sigmoid(self.memory_gate(written)) * (written - memory)

    def _final_norm(self) -> nn.Module:
        """The backbone's final norm, whose input is the residual stream that ``memory_source="residual"``
        writes to memory."""
        base = self.backbone.base_model
        for name in _FINAL_NORM_NAMES:
            module = getattr(base, name, None)
            if isinstance(module, nn.Module):
                return module
        raise ValueError(
            f"memory_source='residual' needs the backbone's final norm, looked up as one of {_FINAL_NORM_NAMES} "
            f"on {type(base).__name__}, which has none; use memory_source='output'"
        )

    def _backbone(self, embeds, mask, cache=None, use_cache=False):
        """The backbone's output and the states its last positions write to memory (the last hidden states,
        or with ``memory_source="residual"`` the residual stream entering the final norm)."""
        kwargs = {CACHE_NAME: cache} if cache is not None else {}
        captured = []
        hook = None
        if self.config.memory_source == "residual":
            hook = self._final_norm().register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            out = self.backbone(
                inputs_embeds=embeds,
                attention_mask=mask,
                use_cache=use_cache,
                output_hidden_states=True,
                **kwargs,
            )
        finally:
            if hook is not None:
                hook.remove()
        if hook is not None and not captured:
            raise RuntimeError(
                f"memory_source='residual': the backbone's final norm ({type(self._final_norm()).__name__}) was not "
                f"called as a module in {type(self.backbone).__name__}'s forward, so its input is unknown; use "
                "memory_source='output'"
            )
        return out, (captured[-1] if hook is not None else out.hidden_states[-1])

    def _segment(self, embeds, mask, memory, with_hidden: bool):
        """One segment as ``[memory, tokens, memory]``: (logits, last hidden, hidden states of every layer or
        None) over its tokens, and the memory its write tokens hold."""
        M, t = self.config.num_mem_tokens, embeds.shape[1]
        if memory is not None:
            embeds = torch.cat([memory.to(embeds.dtype), embeds, memory.to(embeds.dtype)], dim=1)
            if mask is not None:
                ones = mask.new_ones(mask.shape[0], M)
                mask = torch.cat([ones, mask, ones], dim=1)
        out, written = self._backbone(embeds, mask)
        hidden = out.hidden_states[-1]
        layers = tuple(h[:, M : M + t] for h in out.hidden_states) if with_hidden else None
        new_memory = self._update(memory, written[:, M + t :]) if memory is not None else None
        return out.logits[:, M : M + t], hidden[:, M : M + t], layers, new_memory

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RMTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        memory_state: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        loss_positions: torch.Tensor | None = None,
    ) -> RMTModelOutput:
        """``memory_state`` (B, M, C): the memory to start from (default: the learned initial memory); the output
        carries the memory after the last segment, written even when that segment is short, so that calls over
        consecutive segments equal one call. ``cache``: decoding state (see :class:`RMTCache`). ``position_ids``
        only mark packed documents (where they restart at 0); inside a segment the backbone numbers positions.
        ``loss_positions`` (B, T) bool: the positions whose logits a loss reads (``RMTForCausalLM`` passes them
        with its labels); with ``bptt_depth``, a segment before the truncation whose positions no loss reads
        contributes no gradient at all and runs without autograd (its logits and hidden states carry no graph)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if cache is not None and not isinstance(cache, RMTCache):
            raise ValueError(f"RMTModel: the cache must be an RMTCache, got {type(cache).__name__}")
        if cache is not None and memory_state is not None:
            raise ValueError("pass either memory_state or cache, not both (the cache holds the memory)")
        B, T, _ = inputs_embeds.shape
        if memory_state is not None and (
            self.memory is None or memory_state.shape != (B, *self.memory.shape)
        ):
            want = None if self.memory is None else (B, *self.memory.shape)
            raise ValueError(f"memory_state has shape {tuple(memory_state.shape)}, expected {want}")
        with_hidden = bool(output_hidden_states)
        fresh = cache is None or cache.seen_tokens == 0
        if fresh and _several_documents(position_ids, attention_mask):
            return self._documents(inputs_embeds, attention_mask, position_ids, with_hidden)
        left = self.config.segment_alignment == "left"
        # by default, right and center alignments (which cut the whole input anew) run without a cache
        if cache is None and not (resolve_use_cache(self, use_cache) and (left or use_cache)):
            return self._segments(inputs_embeds, attention_mask, memory_state, with_hidden, loss_positions)
        if not left:
            raise ValueError(
                f"decoding with a cache extends the last segment, which needs segment_alignment='left', got "
                f"{self.config.segment_alignment!r}; pass use_cache=False"
            )
        return self._cached(inputs_embeds, attention_mask, cache, memory_state, with_hidden)

    def _segments(self, embeds, mask, memory, with_hidden, loss_positions=None) -> RMTModelOutput:
        """The whole input, segment by segment, without a cache (training, streaming by ``memory_state``);
        ``loss_positions`` as in :meth:`forward`."""
        B, T, _ = embeds.shape
        align = self.config.segment_alignment
        if align == "center" and mask is not None and not bool(mask.all()):
            # centred segments depend on the length: a padded row is cut by its own real length
            return self._rows_alone(embeds, mask, memory, with_hidden)
        shift = None
        if mask is not None and align in ("left", "right"):
            real = mask.bool()
            if align == "left":  # leading padding moves to the end
                shift = (real.long().cumsum(-1) == 0).sum(-1)
            else:  # trailing padding moves to the front
                shift = -(real.flip(-1).long().cumsum(-1) == 0).sum(-1)
            embeds, mask = _roll_rows(embeds, shift), _roll_rows(mask, shift)
            if loss_positions is not None:
                loss_positions = _roll_rows(loss_positions, shift)
        memory = memory if memory is not None else self.initial_memory(B)
        bounds = segment_bounds(T, self.config.segment_length, align)
        depth = self.config.bptt_depth
        logits, hidden, layers = [], [], []
        for i, (s, e) in enumerate(bounds):
            seg_mask = mask[:, s:e] if mask is not None else None
            truncated = depth is not None and i < len(bounds) - depth  # the memory it writes is detached
            if truncated and loss_positions is not None and not bool(loss_positions[:, s:e].any()):
                # nothing of this segment reaches the loss: no graph (its backward would be zeros)
                with torch.no_grad():
                    out = self._segment(embeds[:, s:e], seg_mask, memory, with_hidden)
            elif self.gradient_checkpointing and self.training:
                # Per-segment checkpointing: only the segment's inputs and memory are kept for the backward.
                out = checkpoint(
                    self._segment, embeds[:, s:e], seg_mask, memory, with_hidden, use_reentrant=False
                )
            else:
                out = self._segment(embeds[:, s:e], seg_mask, memory, with_hidden)
            seg_logits, seg_hidden, seg_layers, new_memory = out
            if new_memory is not None:
                if seg_mask is not None:  # a row without a real token in this segment keeps its memory
                    new_memory = torch.where(seg_mask.bool().any(-1)[:, None, None], new_memory, memory)
                if truncated:
                    new_memory = new_memory.detach()
                memory = new_memory
            logits.append(seg_logits)
            hidden.append(seg_hidden)
            layers.append(seg_layers)
        logits, hidden = torch.cat(logits, 1), torch.cat(hidden, 1)
        all_hidden = tuple(torch.cat(h, 1) for h in zip(*layers)) if with_hidden else None
        if shift is not None:
            logits, hidden = _roll_rows(logits, -shift), _roll_rows(hidden, -shift)
            if all_hidden is not None:
                all_hidden = tuple(_roll_rows(h, -shift) for h in all_hidden)
        return with_cache(
            RMTModelOutput,
            None,
            last_hidden_state=hidden,
            logits=logits,
            hidden_states=all_hidden,
            memory_state=memory,
        )

    def _rows_alone(self, embeds, mask, memory, with_hidden) -> RMTModelOutput:
        """Each row's real tokens (mask 1) through the segment loop alone; zeros at padding; a row without a real
        token keeps its memory."""
        B, T, _ = embeds.shape
        memory = memory if memory is not None else self.initial_memory(B)
        real = mask.bool()
        logits = hidden = all_hidden = None
        memories = []
        for b in range(B):
            idx = real[b].nonzero().flatten()
            row_memory = None if memory is None else memory[b : b + 1]
            if idx.numel() == 0:
                memories.append(row_memory)
                continue
            ones = mask.new_ones(1, idx.numel())
            out = self._segments(embeds[b : b + 1, idx], ones, row_memory, with_hidden)
            memories.append(out.memory_state)
            logits, hidden, all_hidden = _place_row(
                out, b, idx, (B, T), logits, hidden, all_hidden, with_hidden
            )
        if logits is None:
            raise ValueError("RMT got an input in which no row has a real token (attention_mask all 0)")
        return with_cache(
            RMTModelOutput,
            None,
            last_hidden_state=hidden,
            logits=logits,
            hidden_states=all_hidden,
            memory_state=None if memory is None else torch.cat(memories),
        )

    def _documents(self, embeds, mask, position_ids, with_hidden) -> RMTModelOutput:
        """Packed documents: each processed alone, from the initial memory. No cache or memory is returned."""
        starts = document_starts(position_ids)
        rows = []
        for b in range(embeds.shape[0]):
            idx = starts[b].nonzero().flatten().tolist() + [embeds.shape[1]]
            docs = [
                self._segments(
                    embeds[b : b + 1, s:e], None if mask is None else mask[b : b + 1, s:e], None, with_hidden
                )
                for s, e in zip(idx, idx[1:])
            ]
            rows.append(docs)

        def stitch(field):
            return torch.cat([torch.cat([getattr(d, field) for d in docs], 1) for docs in rows], 0)

        all_hidden = None
        if with_hidden:
            per_row = [tuple(torch.cat(h, 1) for h in zip(*(d.hidden_states for d in docs))) for docs in rows]
            all_hidden = tuple(torch.cat(h, 0) for h in zip(*per_row))
        return with_cache(
            RMTModelOutput,
            None,
            last_hidden_state=stitch("last_hidden_state"),
            logits=stitch("logits"),
            hidden_states=all_hidden,
        )

    def _cached(self, embeds, mask, cache, memory_state, with_hidden) -> RMTModelOutput:
        """Extends the open segment of ``cache`` with the backbone's own cache; writes the memory and opens a new
        segment each time one fills."""
        B, T, _ = embeds.shape
        M, S = self.config.num_mem_tokens, self.config.segment_length
        if cache is None:
            cache = RMTCache(memory_state if memory_state is not None else self.initial_memory(B))
        if mask is not None:
            mask = mask[:, -T:]
            # left padding: each row's segments start at its own first token, so each row decodes alone
            if cache.seen_tokens == 0 and cache.rows is None and bool((mask.long().cumsum(-1) == 0).any()):
                cache.split_rows(B)
        if cache.rows is not None:
            return self._cached_rows(embeds, mask, cache, with_hidden)
        logits, hidden, layers = [], [], []
        pos = 0
        while pos < T:
            take = min(T - pos, S - cache.open_len)
            piece = embeds[:, pos : pos + take]
            piece_mask = (
                mask[:, pos : pos + take] if mask is not None else piece.new_ones(B, take, dtype=torch.long)
            )
            if cache.open_len == 0:  # a new segment reads the memory first
                cache.backbone_cache, cache.mask = None, piece_mask.new_ones(B, M)
                if cache.memory is not None:
                    piece = torch.cat([cache.memory.to(piece.dtype), piece], dim=1)
            cache.mask = torch.cat([cache.mask, piece_mask], dim=1)
            out, _ = self._backbone(
                piece, self._mask_or_none(cache.mask, mask), cache.backbone_cache, use_cache=True
            )
            cache.backbone_cache = output_cache(out)
            n = out.logits.shape[1]
            logits.append(out.logits[:, n - take :])
            hidden.append(out.hidden_states[-1][:, n - take :])
            layers.append(tuple(h[:, n - take :] for h in out.hidden_states) if with_hidden else None)
            cache.open_len += take
            cache.seen_tokens += take
            pos += take
            if cache.open_len == S:
                self._close_segment(cache, mask)
        all_hidden = tuple(torch.cat(h, 1) for h in zip(*layers)) if with_hidden else None
        return with_cache(
            RMTModelOutput,
            cache,
            last_hidden_state=torch.cat(hidden, 1),
            logits=torch.cat(logits, 1),
            hidden_states=all_hidden,
            memory_state=cache.memory if cache.open_len == 0 else None,
        )

    def _cached_rows(self, embeds, mask, cache, with_hidden) -> RMTModelOutput:
        """Each row's real tokens (mask 1) through its own single-row cache, as if it were decoded alone; the
        outputs at padding positions are zero."""
        B, T, _ = embeds.shape
        if len(cache.rows) != B:
            raise ValueError(f"the RMTCache holds {len(cache.rows)} rows, the input {B}")
        real = mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool, device=embeds.device)
        logits = hidden = all_hidden = None
        for b, row in enumerate(cache.rows):
            idx = real[b].nonzero().flatten()
            if idx.numel() == 0:
                continue
            # a mask of ones, as generate() gives a single unpadded prompt
            ones = torch.ones(1, idx.numel(), dtype=torch.long, device=embeds.device)
            out = self._cached(embeds[b : b + 1, idx], ones, row, None, with_hidden)
            logits, hidden, all_hidden = _place_row(
                out, b, idx, (B, T), logits, hidden, all_hidden, with_hidden
            )
        if logits is None:
            raise ValueError(
                "RMT decoding got a step in which no row has a real token (attention_mask all 0)"
            )
        cache.seen_tokens += T
        closed = all(row.open_len == 0 for row in cache.rows)
        memory = torch.cat([row.memory for row in cache.rows]) if closed and self.memory is not None else None
        return with_cache(
            RMTModelOutput,
            cache,
            last_hidden_state=hidden,
            logits=logits,
            hidden_states=all_hidden,
            memory_state=memory,
        )

    @staticmethod
    def _mask_or_none(full_mask, given):
        # the backbone gets a mask when the caller gave one or some token of the open segment is padding
        if given is None and bool(full_mask.all()):
            return None
        return full_mask

    def _close_segment(self, cache: RMTCache, given_mask) -> None:
        """The write memory tokens, after the segment in the backbone's cache, become the next memory."""
        memory = cache.memory
        if memory is not None:
            M = memory.shape[1]
            full_mask = torch.cat([cache.mask, cache.mask.new_ones(cache.mask.shape[0], M)], dim=1)
            _, written = self._backbone(
                memory, self._mask_or_none(full_mask, given_mask), cache.backbone_cache, use_cache=True
            )
            real = cache.mask[:, M:].bool().any(-1)
            cache.memory = torch.where(real[:, None, None], self._update(memory, written[:, -M:]), memory)
        cache.backbone_cache, cache.mask, cache.open_len = None, None, 0


class RMTForCausalLM(RMTPreTrainedModel, GenerationMixin):
    """RMT language model: the backbone's logits over every segment, and the loss over all of them."""

    def __init__(self, config: RMTConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = RMTModel(config, backbone)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.backbone.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.backbone.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.model.backbone.set_output_embeddings(value)

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RMTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        memory_state: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.LongTensor | None = None,
    ) -> RMTCausalLMOutput:
        """``labels``: the input ids (shifted inside, across segment boundaries too), -100 where there is no
        target. See :meth:`RMTModel.forward` for ``memory_state`` and ``cache``. With ``bptt_depth`` and
        gradients on, the segments before the truncation that hold no target run without autograd (a loss on the
        answer alone then trains at the cost of the last ``bptt_depth`` segments' backward)."""
        loss_positions = None
        if self.config.bptt_depth is not None and torch.is_grad_enabled():
            if shift_labels is not None:
                loss_positions = shift_labels != -100
            elif labels is not None:
                loss_positions = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            memory_state=memory_state,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            loss_positions=loss_positions,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = outputs.logits[:, keep]
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits=outputs.logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                shift_labels=shift_labels,
            )
        return with_cache(
            RMTCausalLMOutput,
            output_cache(outputs),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            memory_state=outputs.memory_state,
        )

    def generate(self, *args, **kwargs):
        """transformers' ``generate``. Prompt segments are processed into memory by the first forward; decoding
        extends the last segment and carries the memory across the segment boundaries it crosses; left-padded
        prompts decode row by row (see :class:`RMTCache`), each as if alone. Right and center alignments cut the
        whole sequence anew at every step, so they decode without a cache."""
        if self.config.segment_alignment != "left":
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)

    @classmethod
    def from_backbone(
        cls, path_or_model, *, num_mem_tokens: int, segment_length: int, **config_kwargs
    ) -> RMTForCausalLM:
        """Wrap a pretrained causal LM (a transformers or zoo model, or a path / hub id to load one with
        ``AutoModelForCausalLM``); the memory starts as ``randn * std(input embeddings)``, as the authors'."""
        backbone = path_or_model
        if isinstance(path_or_model, str):
            backbone = AutoModelForCausalLM.from_pretrained(path_or_model)
        if not isinstance(backbone, PreTrainedModel):
            raise ValueError(
                f"from_backbone takes a causal LM (PreTrainedModel) or a path, got {type(path_or_model).__name__}"
            )
        # building the wrapper's config and model resets its sub-config's attention setting (the backbone's
        # own config object): keep the backbone's
        attn = backbone.config._attn_implementation
        config = RMTConfig(
            backbone=backbone.config,
            num_mem_tokens=num_mem_tokens,
            segment_length=segment_length,
            **config_kwargs,
        )
        config._attn_implementation = attn
        model = cls(config, backbone=backbone)
        backbone.config._attn_implementation = attn
        if model.model.memory is not None:
            emb = backbone.get_input_embeddings().weight
            with torch.no_grad():
                model.model.memory.copy_(torch.randn_like(model.model.memory) * emb.std())
        return model

    @classmethod
    def from_booydar(
        cls, state_dict: dict, backbone, *, num_mem_tokens: int, segment_length: int, **config_kwargs
    ) -> RMTForCausalLM:
        """Load a checkpoint of the authors' ``RecurrentWrapper`` (keys ``memory_cell.memory`` and
        ``memory_cell.model.*``) over ``backbone``, a causal LM or its config (the authors' ``segment_size`` is
        ``segment_length``, their ``segment_alignment`` the same name, default left)."""
        if not isinstance(backbone, PreTrainedModel):
            backbone = AutoModelForCausalLM.from_config(backbone)
        prefix = "memory_cell.model."
        inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        other = sorted(k for k in state_dict if not k.startswith(prefix) and k != "memory_cell.memory")
        if other or not inner:
            raise ValueError(
                f"not a RecurrentWrapper checkpoint: expected keys 'memory_cell.memory' and 'memory_cell.model.*', "
                f"got unexpected {other[:5]}"
                if other
                else "not a RecurrentWrapper checkpoint: no 'memory_cell.model.*' keys"
            )
        memory = state_dict.get("memory_cell.memory")
        have = 0 if memory is None else memory.shape[0]
        if have != num_mem_tokens:
            raise ValueError(
                f"num_mem_tokens={num_mem_tokens} but the checkpoint's memory_cell.memory holds {have}"
            )
        model = cls.from_backbone(
            backbone, num_mem_tokens=num_mem_tokens, segment_length=segment_length, **config_kwargs
        )
        missing, unexpected = model.model.backbone.load_state_dict(inner, strict=False)
        tied = (
            {k for k in missing if k.endswith("lm_head.weight")}
            if backbone.config.tie_word_embeddings
            else set()
        )
        # old transformers saved GPT-2's causal mask buffers, which are no longer parameters
        stale = {k for k in unexpected if k.endswith((".attn.bias", ".attn.masked_bias"))}
        if set(missing) - tied or set(unexpected) - stale:
            raise ValueError(
                f"the checkpoint does not fit the backbone: missing {sorted(set(missing) - tied)[:5]}, "
                f"unexpected {sorted(set(unexpected) - stale)[:5]}"
            )
        if memory is not None:
            with torch.no_grad():
                model.model.memory.copy_(memory)
        return model


class RMTForSequenceClassification(RMTPreTrainedModel):
    """Scores the final hidden state of the last real token, after every segment (as the RMT encoder papers
    classify long documents), with a linear ``score`` head."""

    def __init__(self, config: RMTConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RMTModel(config, backbone)
        width = self.model.get_input_embeddings().weight.shape[1]
        self.score = nn.Linear(width, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "score", None):
            module.weight.normal_(0.0, getattr(self.config.backbone, "initializer_range", 0.02))

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )
        # the last real token by the attention mask only (a wrapper's inputs carry no pad id of their own)
        return classify_last_token(self.score, self.config, outputs, attention_mask, input_ids, None, labels)


__all__ = [
    "RMTCache",
    "RMTForCausalLM",
    "RMTForSequenceClassification",
    "RMTModel",
    "RMTPreTrainedModel",
    "segment_bounds",
]
