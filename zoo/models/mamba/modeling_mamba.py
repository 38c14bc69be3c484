"""Mamba: linear-time sequence modelling with selective state spaces (Gu & Dao, 2023, arXiv:2312.00752).

Each block is ``x + mixer(norm(x))``. The mixer, per token t and inner channel d (``intermediate_size`` of
them, N = ``state_size`` states each):

    h, z   = in_proj(x)                                   two (B, T, Dc) halves: the SSM input and the gate
    u      = act(causal_conv1d(h))                         short depthwise convolution (``zoo.ops.causal_conv1d``)
    dt, B, C = dt_proj(low-rank part of x_proj(u)), x_proj(u) ...    input-dependent step and projections
    dt     = softplus(dt)
    s_t    = exp(dt_t A) * s_{t-1} + dt_t B_t u_t          A = -exp(A_log), (Dc, N) (``zoo.ops.selective_scan``)
    y_t    = s_t C_t + D u_t,   y = y * silu(z),  out = out_proj(y)

With ``mixer_rms_norm`` (FalconMamba, Zuo et al., 2024, arXiv:2410.05355), dt (before ``dt_proj``), B and C are
RMS-normalised without a weight.

Weight names follow transformers' ``MambaForCausalLM`` under zoo's ``model.`` prefix (``convert_mamba.py``):
``backbone.embeddings`` -> ``model.embed_tokens``, ``backbone.layers.{i}.{norm,mixer.*}`` ->
``model.layers.{i}.{norm,mixer.*}``, ``backbone.norm_f`` -> ``model.norm``.

Decoding keeps, per layer, the last ``conv_kernel - 1`` convolution inputs and the (Dc, N) SSM state: O(1) per
token. Padding follows transformers: padded positions are zeroed before the input projection and after the
convolution, so left padding leaves the state at zero. Packed documents (position ids restarting at 0) run as
separate sequences inside one op call (``cu_seqlens``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.mamba.configuration_mamba import ZooMambaConfig
from zoo.models.utils import CACHE_NAME, BackboneInputs, ZooBackbone
from zoo.modules import PackedDocuments, RecurrentCache, RMSNorm, rms_norm
from zoo.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from zoo.ops.selective_scan import selective_scan, selective_scan_step


class MambaMixer(nn.Module):
    def __init__(self, config: ZooMambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        C, Dc, N, K, R = (
            config.hidden_size,
            config.intermediate_size,
            config.state_size,
            config.conv_kernel,
            config.time_step_rank,
        )
        self.state_size, self.time_step_rank = N, R
        self.in_proj = nn.Linear(C, 2 * Dc, bias=config.use_bias)
        # nn.Conv1d only to hold the weight in transformers' layout (Dc, 1, K); the op does the convolution
        self.conv1d = nn.Conv1d(Dc, Dc, K, groups=Dc, padding=K - 1, bias=config.use_conv_bias)
        self.x_proj = nn.Linear(Dc, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, Dc, bias=True)
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(Dc, N).clone()
        )
        self.D = nn.Parameter(torch.ones(Dc))
        self.out_proj = nn.Linear(Dc, C, bias=config.use_bias)
        self.act = ACT2FN[config.hidden_act]
        # the convolution op fuses SiLU; another ``hidden_act`` is applied after it. The output gate is SiLU
        # whatever ``hidden_act`` says, as in mamba_ssm and transformers.
        self.fused_silu = config.hidden_act in ("silu", "swish")

    @torch.no_grad()
    def init_ssm_weights(self) -> None:
        """S4D-real initialisation of A, unit skip, time steps log-uniform in [time_step_min, time_step_max]
        (called by every model that holds this mixer, zoo's hybrids included)."""
        cfg = self.config
        N = cfg.state_size
        init.copy_(self.A_log, torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand_as(self.A_log))
        init.ones_(self.D)
        std = cfg.time_step_rank**-0.5 * cfg.time_step_scale
        if cfg.time_step_init_scheme == "constant":
            init.constant_(self.dt_proj.weight, std)
        else:
            init.uniform_(self.dt_proj.weight, -std, std)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dt = torch.exp(torch.rand(cfg.intermediate_size) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            init.zeros_(self.conv1d.bias)
        init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        if cfg.rescale_prenorm_residual:
            self.out_proj.weight /= math.sqrt(cfg.num_hidden_layers)

    def forward(
        self, x, pad_mask=None, docs: PackedDocuments | None = None, cache: RecurrentCache | None = None
    ):
        """``x`` (B, T, C); ``pad_mask`` (B, T) 1 = real token; ``docs``: packed documents (B = 1)."""
        B, T, _ = x.shape
        keep = pad_mask.to(x.dtype)[:, :, None] if pad_mask is not None else None
        cached = cache.get(self.layer_idx) if cache is not None else None
        conv_state = cached["conv"] if cached else None
        ssm_state = cached["ssm"] if cached else None
        step = cached is not None and T == 1
        cu_seqlens = docs.cu_seqlens if docs is not None else None
        want_state = cache is not None
        # 1. input projection into the SSM input and the gate
        if keep is not None:
            x = x * keep
        h, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, Dc) each
        # 2. short causal convolution
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias  # (Dc, K), (Dc,)
        act = "silu" if self.fused_silu else None
        if step:
            u, conv_state = causal_conv1d_step(h[:, 0], weight, bias, conv_state, activation=act)
            u = u[:, None]
        else:
            u, conv_state = causal_conv1d(
                h,
                weight,
                bias,
                activation=act,
                initial_state=conv_state,
                output_final_state=want_state,
                cu_seqlens=cu_seqlens,
                backend=self.config.backend,
            )
        if not self.fused_silu:
            u = self.act(u)
        if keep is not None:
            u = u * keep
        # 3. input-dependent time step and projections
        dt, B_t, C_t = self.x_proj(u).split([self.time_step_rank, self.state_size, self.state_size], dim=-1)
        if self.config.mixer_rms_norm:  # FalconMamba: weightless RMS norms on dt, B and C
            eps = self.config.mixer_rms_eps
            dt, B_t, C_t = rms_norm(dt, eps), rms_norm(B_t, eps), rms_norm(C_t, eps)
        dt = F.softplus(self.dt_proj(dt).float())  # (B, T, Dc)
        A = -torch.exp(self.A_log.float())  # (Dc, N)
        # 4. selective scan, gated by silu(z)
        if step:
            y, ssm_state = selective_scan_step(
                u[:, 0], dt[:, 0], A, B_t[:, 0], C_t[:, 0], self.D, z[:, 0], ssm_state,
            )  # fmt: skip
            y = y[:, None]
        else:
            y, ssm_state = selective_scan(
                u,
                dt,
                A,
                B_t,
                C_t,
                self.D,
                z,
                initial_state=ssm_state,
                output_final_state=want_state,
                cu_seqlens=cu_seqlens,
                backend=self.config.backend,
            )
        if cache is not None:
            if docs is not None:  # each row goes on from its last document
                conv_state, ssm_state = docs.row_states(conv_state), docs.row_states(ssm_state)
            cache.set(self.layer_idx, conv=conv_state, ssm=ssm_state)
        # 5. output projection
        return self.out_proj(y.to(x.dtype))


class MambaBlock(GradientCheckpointingLayer):
    def __init__(self, config: ZooMambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MambaMixer(config, layer_idx)

    def forward(self, hidden_states, pad_mask=None, docs=None, cache=None):
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        out = self.mixer(self.norm(hidden_states.to(self.norm.weight.dtype)), pad_mask, docs, cache)
        return residual + out


class MambaPreTrainedModel(PreTrainedModel):
    config_class = ZooMambaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MambaBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own RecurrentCache.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MambaMixer):
            module.init_ssm_weights()


class MambaModel(ZooBackbone, MambaPreTrainedModel):
    cache_class = RecurrentCache

    def __init__(self, config: ZooMambaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(config, i) for i in range(config.num_hidden_layers))
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


class MambaForCausalLM(CausalLMHead, MambaPreTrainedModel, GenerationMixin):
    backbone_class = MambaModel


class MambaForSequenceClassification(SequenceClassificationHead, MambaPreTrainedModel):
    backbone_class = MambaModel


__all__ = [
    "MambaForCausalLM",
    "MambaForSequenceClassification",
    "MambaMixer",
    "MambaModel",
    "MambaPreTrainedModel",
]
