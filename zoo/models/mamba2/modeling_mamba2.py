"""Mamba-2: state-space duality (Dao & Gu, 2024, arXiv:2405.21060).

Each block is ``x + mixer(norm(x))``. The mixer, with H heads of width P, N states, G groups of heads sharing
B and C:

    z, xBC, dt = in_proj(x)                                 gate (Dc), conv input (Dc + 2 G N), one dt per head
    x, B, C    = split(act(causal_conv1d(xBC)))              (``zoo.ops.causal_conv1d``)
    dt         = clamp(softplus(dt + dt_bias), time_step_limit)        (B, T, H)
    S_t        = exp(dt_t A_h) S_{t-1} + B_tᵀ (dt_t x_t)       A_h = -exp(A_log_h), one scalar decay per head
    y_t        = C_t S_t + D_h x_t
    out        = out_proj(group_rms_norm(y * silu(z)) * weight)

The recurrence is retention with per-token log-gates (q = C, k = B, v = dt x, scale 1), so it runs on
``zoo.ops.retention`` (chunked PyTorch on CPU, Triton on GPU, one-token steps for decoding); B and C go in as
their G groups, [B, T, G, N], which the op shares among the H / G heads of each group without copying them (head
h reads group h // (H / G), the order in which transformers' Mamba2 repeats them). x goes in as it is, with dt as
the values' scale and D as the skip (``retention``'s ``v_scale`` and ``skip``): the op's CPU form applies both in
its passes over the chunks, where dt x and D x would each be a full-size pass of their own. Weight names follow
transformers' ``Mamba2ForCausalLM`` under zoo's ``model.`` prefix (``convert_mamba2.py``). Padding and packed
documents as in zoo's Mamba.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.mamba2.configuration_mamba2 import ZooMamba2Config
from zoo.models.utils import CACHE_NAME, BackboneInputs, ZooBackbone
from zoo.modules import PackedDocuments, RecurrentCache, RMSNorm
from zoo.modules.norms import inverse_rms
from zoo.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from zoo.ops.dispatch import resolve_backend
from zoo.ops.retention import default_chunk_size, retention, retention_step


class _TimeSteps(torch.autograd.Function):
    """Step 3 of the mixer in one node: dt = clamp(softplus(dt_raw + dt_bias), lo, hi) (B, T, H) and the log-decays
    dt * A with A = -exp(A_log) (B, T, H); dt_raw may be a strided slice of the projection. The scan takes dt as the
    scale of its values x (``retention``'s ``v_scale``: v = dt x without forming it), so that this node only does
    the small (B, T, H) algebra, by hand, where autograd would keep a node per elementwise op."""

    @staticmethod
    def forward(ctx, dt_raw, dt_bias, A_log, lo: float, hi: float):
        pre = dt_raw + dt_bias
        dt = F.softplus(pre)
        inside = (dt >= lo) & (dt <= hi)  # where the clamp passes the gradient on
        dt = dt.clamp_(min=lo, max=hi)
        A = -torch.exp(A_log)
        ctx.save_for_backward(pre, dt, inside, A)
        return dt, dt * A

    @staticmethod
    @once_differentiable
    def backward(ctx, d_dt, d_log_decay):
        pre, dt, inside, A = ctx.saved_tensors
        d_dt = d_dt.addcmul(d_log_decay, A)  # (B, T, H)
        d_A_log = (d_log_decay * dt).sum((0, 1)).mul_(A) if ctx.needs_input_grad[2] else None
        d_pre = torch.ops.aten.softplus_backward(d_dt, pre, 1.0, 20.0).mul_(inside)
        d_bias = d_pre.sum((0, 1)) if ctx.needs_input_grad[1] else None
        return d_pre, d_bias, d_A_log, None, None


class _GatedGroupNorm(torch.autograd.Function):
    """Step 5 of the mixer in one node: out = weight * rms_norm_groups(y * silu(z)), the swish gate and the RMS norm
    within each of G groups of channels (the D skip is already in y: the scan adds it, ``retention``'s ``skip``). y
    (B, T, H P) contiguous; z (B, T, H P) may be a strided slice. Keeps y, silu(z), the normalised gated input n and
    its inverse RMS r; the backward is dweight = sum dout n, dh = r (dn - n mean(dn n)) with dn = dout weight, then
    the gate's products."""

    @staticmethod
    def forward(ctx, y, z, weight, eps: float, groups: int):
        B, T, D = y.shape
        gate = F.silu(z).contiguous()  # (B, T, H P)
        n = (gate * y).view(B, T, groups, D // groups)
        r = inverse_rms(n, eps)
        n = n.mul_(r).view(B, T, D)
        ctx.groups = groups
        ctx.save_for_backward(y, z, gate, weight, n, r)
        return n * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        y, z, gate, weight, n, r = ctx.saved_tensors
        B, T, D = y.shape
        grouped = (B, T, ctx.groups, D // ctx.groups)
        prod = d_out * n
        d_weight = prod.sum((0, 1)) if ctx.needs_input_grad[2] else None
        # mean(dn n) per group with dn = d_out weight: the weight's dot product with d_out n, summed anyway for
        # dweight (one matrix-vector product for a single group)
        if ctx.groups == 1:
            mean = (prod.view(B * T, D) @ weight).view(B, T, 1, 1)
        else:
            mean = (prod.view(grouped) * weight.view(grouped[2:])).sum(-1, keepdim=True)
        mean.div_(grouped[-1])
        del prod
        dn = (d_out * weight).view(grouped)
        n = n.view(grouped)
        dh = dn.addcmul_(n, mean, value=-1).mul_(r).view(B, T, D)  # d(gated input)
        dz = torch.ops.aten.silu_backward(dh * y, z) if ctx.needs_input_grad[1] else None
        dy = dh.mul_(gate)
        return dy, dz, d_weight, None, None


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ZooMamba2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        C, Dc, H, N, G, K = (
            config.hidden_size,
            config.intermediate_size,
            config.num_heads,
            config.state_size,
            config.n_groups,
            config.conv_kernel,
        )
        self.num_heads, self.head_dim, self.state_size, self.n_groups = H, config.head_dim, N, G
        self.conv_dim = Dc + 2 * G * N
        self.in_proj = nn.Linear(C, Dc + self.conv_dim + H, bias=config.use_bias)
        # nn.Conv1d only to hold the weight in transformers' layout (conv_dim, 1, K); the op does the convolution
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, padding=K - 1,
                                bias=config.use_conv_bias)  # fmt: skip
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = RMSNorm(Dc, eps=config.layer_norm_epsilon)  # the gated group norm's weight
        self.out_proj = nn.Linear(Dc, C, bias=config.use_bias)
        self.act = ACT2FN[config.hidden_act]
        self.fused_silu = config.hidden_act in ("silu", "swish")

    @torch.no_grad()
    def init_ssm_weights(self) -> None:
        """A = -(1..H), unit skip, time-step bias log-uniform in [time_step_min, time_step_max] (called by every
        model that holds this mixer, zoo's hybrids included)."""
        cfg = self.config
        H = cfg.num_heads
        init.copy_(self.A_log, torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        init.ones_(self.D)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dt = torch.exp(torch.rand(H) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.ones_(self.norm.weight)
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            init.zeros_(self.conv1d.bias)
        init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        if cfg.rescale_prenorm_residual:
            self.out_proj.weight /= math.sqrt(cfg.num_hidden_layers)

    def scan_chunk_size(self, device: torch.device) -> int:
        """The chunk length of the scan on ``device``: the config's ``chunk_size``, or the op's choice for the backend
        and head sizes (``zoo.ops.retention.default_chunk_size``) when it is None."""
        if self.config.chunk_size is not None:
            return self.config.chunk_size
        backend = resolve_backend("retention", self.config.backend, device)
        return default_chunk_size(backend, self.state_size, self.head_dim)

    def gated_group_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """weight * RMS norm of ``y * silu(z)`` within each of the G groups of channels: y (B, T, H P) with the D
        skip in it, z (B, T, H P), both in the computing dtype (at least float32); the result in it."""
        return _GatedGroupNorm.apply(y, z, self.norm.weight.to(y.dtype), self.norm.eps, self.n_groups)

    def forward(
        self, x, pad_mask=None, docs: PackedDocuments | None = None, cache: RecurrentCache | None = None
    ):
        """``x`` (B, T, C); ``pad_mask`` (B, T) 1 = real token; ``docs``: packed documents (B = 1)."""
        Bsz, T, _ = x.shape
        H, P, N, G = self.num_heads, self.head_dim, self.state_size, self.n_groups
        Dc = H * P
        keep = pad_mask.to(x.dtype)[:, :, None] if pad_mask is not None else None
        cached = cache.get(self.layer_idx) if cache is not None else None
        conv_state = cached["conv"] if cached else None
        ssm_state = cached["ssm"] if cached else None
        step = cached is not None and T == 1
        cu_seqlens = docs.cu_seqlens if docs is not None else None
        want_state = cache is not None
        # 1. input projection: gate, convolution input, time steps
        if keep is not None:
            x = x * keep
        z, xBC, dt = self.in_proj(x).split([Dc, self.conv_dim, H], dim=-1)
        # 2. short causal convolution over x, B and C together
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        act = "silu" if self.fused_silu else None
        if step:
            xBC, conv_state = causal_conv1d_step(xBC[:, 0], weight, bias, conv_state, activation=act)
            xBC = xBC[:, None]
        else:
            # xBC is a strided slice of the projection: one copy makes the convolution's K shifted reads (and those
            # of its backward) contiguous, which measured faster on a CPU than reading the slice each time
            xBC, conv_state = causal_conv1d(
                xBC.contiguous(), weight, bias, activation=act, initial_state=conv_state,
                output_final_state=want_state, cu_seqlens=cu_seqlens, backend=self.config.backend,
            )  # fmt: skip
        if not self.fused_silu:
            xBC = self.act(xBC)
        if keep is not None:
            xBC = xBC * keep
        u, B_t, C_t = xBC.split([Dc, G * N, G * N], dim=-1)
        u = u.view(Bsz, T, H, P)
        # B and C of each group serve its H / G heads: the op reads them grouped
        B_t, C_t = B_t.view(Bsz, T, G, N), C_t.view(Bsz, T, G, N)
        # 3. time steps and the per-head, per-token log-decay, in at least float32
        acc = torch.promote_types(x.dtype, torch.float32)
        u = u.to(acc)
        lo, hi = self.config.time_step_limit
        dt, log_decay = _TimeSteps.apply(
            dt.to(acc), self.dt_bias.to(acc), self.A_log.to(acc), lo, hi
        )  # (B, T, H): the time steps and dt A <= 0
        # 4. state-space scan as retention: q = C, k = B, v = dt x (x scaled by dt inside the op), scale 1
        if step:
            y, ssm_state = retention_step(
                C_t[:, 0].to(acc), B_t[:, 0].to(acc), u[:, 0] * dt[:, 0, :, None], log_decay[:, 0], ssm_state,
                scale=1.0,
            )  # fmt: skip
            y = torch.addcmul(y, u[:, 0], self.D.to(acc)[:, None])[:, None]  # the D skip
        else:
            y, ssm_state = retention(
                C_t.to(acc), B_t.to(acc), u, log_decay, scale=1.0, initial_state=ssm_state, v_scale=dt,
                skip=self.D.to(acc),
                output_final_state=want_state, cu_seqlens=cu_seqlens, chunk_size=self.scan_chunk_size(x.device),
                backend=self.config.backend,
            )  # fmt: skip
        if cache is not None:
            if docs is not None:  # each row goes on from its last document
                conv_state, ssm_state = docs.row_states(conv_state), docs.row_states(ssm_state)
            cache.set(self.layer_idx, conv=conv_state, ssm=ssm_state)
        # 5. gated group norm (the D skip is in y), output projection
        y = y.reshape(Bsz, T, Dc).contiguous()
        return self.out_proj(self.gated_group_norm(y, z.to(acc)).to(x.dtype))


class Mamba2Block(GradientCheckpointingLayer):
    def __init__(self, config: ZooMamba2Config, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(config, layer_idx)

    def forward(self, hidden_states, pad_mask=None, docs=None, cache=None):
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        out = self.mixer(self.norm(hidden_states.to(self.norm.weight.dtype)), pad_mask, docs, cache)
        return residual + out


class Mamba2PreTrainedModel(PreTrainedModel):
    config_class = ZooMamba2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Mamba2Block"]
    _skip_keys_device_placement = [CACHE_NAME]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own RecurrentCache

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Mamba2Mixer):
            module.init_ssm_weights()


class Mamba2Model(ZooBackbone, Mamba2PreTrainedModel):
    cache_class = RecurrentCache

    def __init__(self, config: ZooMamba2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Mamba2Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def new_cache(self):
        return RecurrentCache(self.config.num_hidden_layers)

    def layers_forward(self, inputs: BackboneInputs, output_hidden_states: bool):
        hidden_states, cache = inputs.embeds, inputs.cache
        B, T, _ = hidden_states.shape
        docs = PackedDocuments.from_position_ids(inputs.position_ids) if inputs.packed else None
        pad_mask = inputs.pad_mask[:, -T:] if inputs.pad_mask is not None else None
        if docs is not None:
            # The ops pack along time with B == 1; the outputs are reshaped back below.
            hidden_states = hidden_states.reshape(1, B * T, -1)
            pad_mask = pad_mask.reshape(1, B * T) if pad_mask is not None else None
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states.reshape(B, T, -1),)
            hidden_states = layer(hidden_states, pad_mask, docs, cache)
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype)).reshape(B, T, -1)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class Mamba2ForCausalLM(CausalLMHead, Mamba2PreTrainedModel, GenerationMixin):
    backbone_class = Mamba2Model


class Mamba2ForSequenceClassification(SequenceClassificationHead, Mamba2PreTrainedModel):
    backbone_class = Mamba2Model


__all__ = [
    "Mamba2ForCausalLM",
    "Mamba2ForSequenceClassification",
    "Mamba2Mixer",
    "Mamba2Model",
    "Mamba2PreTrainedModel",
]
