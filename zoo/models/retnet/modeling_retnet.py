"""RetNet: the Retentive Network (Sun et al., 2023, "Retentive Network: A Successor to Transformer for Large
Language Models", arXiv:2307.08621), with the data-dependent decay of gated linear attention (Yang et al., 2023,
arXiv:2312.06635) as an option.

Each block is ``x + MSR(norm(x))`` then ``x + SwiGLU(norm(x))``. Multi-scale retention (MSR), per head h:

    q, k = rotate(x W_q), rotate(x W_k) * d^-1/2       v, g = x W_v, x W_g        (value width ``value_dim``)
    o_n  = sum_{m<=n} (q_n . k_m) gamma_h^(n-m) v_m      (the ``zoo.ops.retention`` op)
    out  = W_o (swish(g) * GroupNorm_h(o))

Scale-invariant normalisations of the paper, identical in the parallel, chunk and recurrent modes (they only
change the output, never the op): the decay mask's row n is divided by sqrt(sum_m gamma^(n-m)), a per-position
scalar applied after the op; the scores are divided by max(|sum_m s_nm|, 1), whose row sums the op returns with
the output (``output_row_sum``, without gradient as the paper detaches them). The cache then holds the decayed
key sum as one more state column.

Mapping from Microsoft's torchscale RetNet checkpoints (``torchscale.architecture.retnet.RetNetDecoder``), by
renaming only (``convert_retnet.py``):

    embed_tokens.weight                           -> model.embed_tokens.weight
    layers.{i}.retention.{q,k,v,g}_proj.weight    -> model.layers.{i}.retention.{q,k,v,g}_proj.weight
    layers.{i}.retention.out_proj.weight          -> model.layers.{i}.retention.out_proj.weight
    layers.{i}.retention_layer_norm.weight        -> model.layers.{i}.retention_norm.weight
    layers.{i}.ffn.fc1.weight   (activated)       -> model.layers.{i}.mlp.gate_proj.weight
    layers.{i}.ffn.gate.weight                    -> model.layers.{i}.mlp.up_proj.weight
    layers.{i}.ffn.fc2.weight                     -> model.layers.{i}.mlp.down_proj.weight
    layers.{i}.final_layer_norm.weight            -> model.layers.{i}.mlp_norm.weight
    layer_norm.weight                             -> model.norm.weight
    output_projection.weight                      -> lm_head.weight

Conventions shared with torchscale: decay per head log(1 - 2^(-5-h)); the key (not the query) is scaled by
d^-1/2; rotation of adjacent channel pairs with angles 1 / 10000^linspace(0, 1, d/2); a group norm without
affine weights; swish gate; no bias anywhere. torchscale's chunkwise mode normalises per chunk, an
approximation of its parallel form; zoo's three modes all equal the parallel form.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.retnet.configuration_retnet import RetNetConfig
from zoo.models.utils import CACHE_NAME, BackboneInputs, ZooBackbone
from zoo.modules import (
    GatedMLP,
    PackedDocuments,
    RecurrentCache,
    RMSNorm,
    apply_rotary_interleaved,
    build_norm,
    gated_rms_norm,
    rotate_pairs,
)
from zoo.ops.retention import naive as retention_naive
from zoo.ops.retention import retention, retention_step


def retnet_angles(head_dim: int, theta: float) -> torch.Tensor:
    """torchscale's rotation frequencies, each repeated for its channel pair: (head_dim,)."""
    angle = 1.0 / (theta ** torch.linspace(0, 1, head_dim // 2, dtype=torch.float64))
    return angle.repeat_interleave(2)


def xpos_scale(head_dim: int) -> torch.Tensor:
    """xPos per-pair decay base (Sun et al., 2022, "A Length-Extrapolatable Transformer"), repeated: (head_dim,)."""
    half = torch.arange(0, head_dim, 2, dtype=torch.float64)
    return ((half + 0.4 * head_dim) / (1.4 * head_dim)).repeat_interleave(2)


def _table(fn):
    """Memoised in eager mode; under torch.compile computed in the graph (where it folds to a constant)."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def lookup(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    return lookup


@_table
def _log_gammas(gammas: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(gammas, dtype=torch.float64, device=device).log()


@_table
def _angles(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return retnet_angles(head_dim, theta).to(device)


@dataclass
class PositionTerms:
    """What every layer derives from the positions, computed once per forward (all layers share the config).

    Each channel pair of q and of k is multiplied by one complex number: the rotation e^(i n theta), times the
    xPos scale with ``position_encoding="xpos"`` (zeta^(n/base) for q, its inverse for k), so that rotation and
    scaling are one product. ``angle`` (B, T, 1, Dk/2) and ``q_scale``/``k_scale`` (the same shape, or None:
    no scaling) hold them in real form, ``q_phase``/``k_phase`` as complex numbers (complex64, complex128 for
    float64; eager mode only: under torch.compile the real form is used). ``row_scale``: the inverse square
    root of the decay mask's row sums (B, T, H, 1), the paper's first normalisation.
    """

    positions: torch.Tensor
    angle: torch.Tensor | None = None
    q_scale: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    q_phase: torch.Tensor | None = None
    k_phase: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None

    def real_form(self, which: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the rotation of q or k times its scale, each repeated for its pair: (B, T, Dk)."""
        scale = self.q_scale if which == "q" else self.k_scale
        cos, sin = self.angle.cos(), self.angle.sin()
        if scale is not None:
            cos, sin = cos * scale, sin * scale
        return tuple(x.repeat_interleave(2, -1)[:, :, 0].to(dtype) for x in (cos, sin))


def position_terms(config: RetNetConfig, positions: torch.Tensor, dtype: torch.dtype) -> PositionTerms:
    terms = PositionTerms(positions)
    device, acc = positions.device, torch.promote_types(dtype, torch.float32)
    if config.position_encoding != "none":
        angle = _angles(config.head_dim, config.rope_theta, device).to(acc)
        terms.angle = (positions[..., None].to(acc) * angle[::2])[:, :, None]  # one angle per channel pair
        if config.position_encoding == "xpos":  # the scales are per pair too
            power = positions[..., None, None].to(acc) / config.xpos_scale_base  # (B, T, 1, 1)
            zeta = xpos_scale(config.head_dim)[::2].to(device, acc)
            terms.q_scale, terms.k_scale = zeta.pow(power), zeta.pow(-power)
        if not torch.compiler.is_compiling():  # inductor generates no code for complex numbers
            ones = torch.ones_like(terms.angle)
            terms.q_phase = torch.polar(ones if terms.q_scale is None else terms.q_scale, terms.angle)
            terms.k_phase = (
                terms.q_phase if terms.k_scale is None else torch.polar(terms.k_scale, terms.angle)
            )
    if config.normalize and config.decay == "fixed":
        gamma = _log_gammas(tuple(config.gammas()), device).exp()  # (H,)
        mask_sum = (1 - gamma ** (positions[..., None].double() + 1)) / (1 - gamma)  # (B, T, H)
        terms.row_scale = mask_sum.rsqrt().to(acc)[..., None]
    return terms


class MultiScaleRetention(nn.Module):
    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        C, H = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim, self.value_head_dim = H, config.head_dim, config.value_head_dim
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, config.value_dim, bias=False)
        self.g_proj = nn.Linear(C, config.value_dim, bias=False)
        self.out_proj = nn.Linear(config.value_dim, C, bias=False)
        if config.decay == "data_dependent":
            self.decay_proj = nn.Linear(C, H, bias=True)
        self.group_norm = RMSNorm(self.value_head_dim, eps=config.group_norm_eps, elementwise_affine=False)

    def log_gammas(self, device) -> torch.Tensor:
        return _log_gammas(tuple(self.config.gammas()), torch.device(device))

    def rotate(self, q, k, terms: PositionTerms):
        """Rotation (and xPos scaling) of q and k; q may be in another dtype than the terms (autocast)."""
        if terms.angle is None:
            return q, k
        if q.dtype in (torch.float32, torch.float64) and terms.q_phase is not None:
            cdtype = torch.complex128 if q.dtype == torch.float64 else torch.complex64
            return rotate_pairs(q, terms.q_phase.to(cdtype)), rotate_pairs(k, terms.k_phase.to(cdtype))
        # low-precision q (a bf16 model, or autocast), or torch.compile: the real form
        return (
            apply_rotary_interleaved(q, *terms.real_form("q", q.dtype)),
            apply_rotary_interleaved(k, *terms.real_form("k", k.dtype)),
        )

    def retention_op(self, q, k, v, log_decay, state, cu_seqlens, output_final_state, row_sum):
        """Retention over the whole input in the configured mode; with ``row_sum`` also the row sums (B, T, H)."""
        scale = self.head_dim**-0.5
        if self.config.retention_mode == "chunk":
            return retention(
                q,
                k,
                v,
                log_decay,
                scale=scale,
                initial_state=state,
                output_final_state=output_final_state,
                cu_seqlens=cu_seqlens,
                chunk_size=self.config.chunk_size,
                backend=self.config.backend,
                output_row_sum=row_sum,
            )
        fn = (
            retention_naive.naive_parallel_retention
            if self.config.retention_mode == "parallel"
            else retention_naive.naive_recurrent_retention
        )
        B, T, H, _ = q.shape
        args = (q, k, v, log_decay.expand(B, T, H), scale, state, output_final_state, cu_seqlens)
        return retention_naive.with_row_sum(fn, *args) if row_sum else fn(*args)

    def forward(
        self,
        x,
        positions,
        *,
        pad_mask=None,
        docs: PackedDocuments | None = None,
        cache: RecurrentCache | None = None,
    ):
        """``x`` (B, T, C); ``positions`` (B, T) within each document, or their ``PositionTerms``; ``pad_mask``
        (B, T) 1 = real token; ``docs``: packed documents, with the batch flattened to one row (B = 1)."""
        B, T, _ = x.shape
        terms = (
            positions
            if isinstance(positions, PositionTerms)
            else position_terms(self.config, positions, x.dtype)
        )
        H, Dk, Dv = self.num_heads, self.head_dim, self.value_head_dim
        # 1. projections
        q = self.q_proj(x).view(B, T, H, Dk)
        k = self.k_proj(x).view(B, T, H, Dk)
        v = self.v_proj(x).view(B, T, H, Dv)
        g = self.g_proj(x)
        # 2. relative positions by rotation
        q, k = self.rotate(q, k, terms)
        # 3. decay: a fixed log-gamma per head, or per-token log-gates
        fixed = self.config.decay == "fixed"
        acc = torch.promote_types(x.dtype, torch.float32)
        if fixed:
            log_decay = self.log_gammas(x.device).to(acc)  # (H,)
        else:
            log_decay = (
                F.logsigmoid(self.decay_proj(x).to(acc)) / self.config.gate_logit_normalizer
            )  # (B, T, H)
        # Padding tokens are made transparent: no contribution to the state, no decay of it.
        if pad_mask is not None:
            keep = pad_mask.to(k.dtype)[:, :, None, None]
            k = k * keep
            log_decay = log_decay.expand(B, T, H) * pad_mask.to(acc)[:, :, None]
        normalize = self.config.normalize and fixed
        # 4. retention. With the normalisation, the cached state carries one more column: the decayed key sum
        # (the state of a value channel of ones), from which the row sums of the scores come.
        cached = cache.get(self.layer_idx) if cache is not None else None
        state = cached["state"] if cached else None
        need_state = cache is not None
        cu_seqlens = docs.cu_seqlens if docs is not None else None
        if state is not None and T == 1:
            step_decay = log_decay if log_decay.dim() == 1 else log_decay[:, 0]
            v_step = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1) if normalize else v
            o, new_state = retention_step(q, k, v_step, step_decay, state, scale=Dk**-0.5)
            o, row_sum = (o[..., :Dv], o[..., Dv:]) if normalize else (o, None)
        elif normalize:
            # the row sums come with the output (without gradient: the paper detaches them)
            o, new_state, row_sum = self.retention_op(q, k, v, log_decay, state, cu_seqlens, need_state, True)
            row_sum = row_sum[..., None]  # (B, T, H, 1)
        else:
            o, new_state = self.retention_op(q, k, v, log_decay, state, cu_seqlens, need_state, False)
        if cache is not None:
            # packed documents: each row goes on from the state of its last document
            cache.set(self.layer_idx, state=docs.row_states(new_state) if docs is not None else new_state)
        # 5. the paper's normalisations: decay-mask rows by 1/sqrt(row sum), scores by max(|row sum|, 1); both
        # are one detached factor per position and head; then the per-head group norm
        eps = self.group_norm.eps
        if normalize:
            row_scale = terms.row_scale.to(row_sum.dtype)  # (B, T, H, 1)
            factor = row_scale / (row_sum.detach() * row_scale).abs().clamp(min=1.0)
            # group_norm(factor * o) == rms_norm(o, eps / factor^2): the factor folds into a per-row epsilon
            eps = eps / factor.square()
        # 6. the output gate (swish: one Function with the group norm), output projection
        o = gated_rms_norm(o, g.reshape(B, T, H, Dv), eps, self.config.retention_gate_act)
        return self.out_proj(o.reshape(B, T, H * Dv))


class RetNetBlock(GradientCheckpointingLayer):
    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.retention_norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.retention = MultiScaleRetention(config, layer_idx)
        self.mlp_norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, act=config.hidden_act)

    def forward(self, hidden_states, positions, pad_mask=None, docs=None, cache=None):
        hidden_states = hidden_states + self.retention(
            self.retention_norm(hidden_states), positions, pad_mask=pad_mask, docs=docs, cache=cache
        )
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetBlock"]
    _skip_keys_device_placement = [CACHE_NAME]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own RecurrentCache; transformers' DynamicCache holds keys and values.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MultiScaleRetention):
            # torchscale's initialisation of the retention projections.
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.g_proj):
                init.xavier_uniform_(proj.weight, gain=2**-2.5)
            init.xavier_uniform_(module.out_proj.weight, gain=2**-1)
            if hasattr(module, "decay_proj"):
                init.normal_(module.decay_proj.weight, 0.0, self.config.initializer_range)
                # Gates start near 1 (slow forgetting): logsigmoid(4) / 16 ~ -1e-3.
                init.constant_(module.decay_proj.bias, 4.0)


class RetNetModel(ZooBackbone, RetNetPreTrainedModel):
    cache_class = RecurrentCache

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RetNetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def new_cache(self):
        return RecurrentCache(self.config.num_hidden_layers)

    def layers_forward(self, inputs: BackboneInputs, output_hidden_states: bool):
        inputs_embeds, position_ids, cache = inputs.embeds, inputs.position_ids, inputs.cache
        if self.config.scale_embedding:
            inputs_embeds = inputs_embeds * math.sqrt(self.config.hidden_size)
        B, T, _ = inputs_embeds.shape
        # Packed documents become the op's cu_seqlens over the batch flattened to one row.
        docs = PackedDocuments.from_position_ids(position_ids) if inputs.packed else None
        pad_mask = inputs.pad_mask[:, -T:] if inputs.pad_mask is not None else None

        hidden_states = inputs_embeds
        if docs is not None:
            # The op packs along time with B == 1; the outputs are reshaped back below.
            hidden_states = hidden_states.reshape(1, B * T, -1)
            position_ids = position_ids.reshape(1, B * T)
            pad_mask = pad_mask.reshape(1, B * T) if pad_mask is not None else None
        all_hidden = () if output_hidden_states else None
        terms = position_terms(self.config, position_ids, hidden_states.dtype)  # shared by every layer
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states.reshape(B, T, -1),)
            hidden_states = layer(hidden_states, terms, pad_mask, docs, cache)
        hidden_states = self.norm(hidden_states).reshape(B, T, -1)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class RetNetForCausalLM(CausalLMHead, RetNetPreTrainedModel, GenerationMixin):
    backbone_class = RetNetModel


class RetNetForSequenceClassification(SequenceClassificationHead, RetNetPreTrainedModel):
    backbone_class = RetNetModel


__all__ = [
    "MultiScaleRetention",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetModel",
    "RetNetPreTrainedModel",
]
