"""RWKV, versions 4, 6 and 7: a recurrent network trained in parallel.

RWKV-4: Peng et al., 2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048.
RWKV-6 "Finch": Peng et al., 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
arXiv:2404.05892.
RWKV-7 "Goose": Peng et al., 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution", arXiv:2503.14456.

Every version has the same block, after a layer norm of the embeddings (``ln0``)::

    x = x + time_mix(ln1(x))        token shift, then a linear recurrence over time (the "WKV")
    x = x + channel_mix(ln2(x))     token shift, then a squared-ReLU MLP

Token shift mixes each token's input with the previous token's: ``shift(x)_t = x_{t-1}`` (zero before the first
token of a sequence or of a packed document). The time mixing differs by version (B, T, C; H heads of N = C / H):

- 4: ``k, v, r`` from static mixes of ``x`` and ``shift(x)``; per channel ``wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i}
  v_i + e^{u + k_t} v_t) / (the same without v)`` with ``w = exp(time_decay)`` (``zoo.ops.wkv4``, kept stable by
  max tracking); ``out = output(sigmoid(r) * wkv)``.
- 6: the mixes are data-dependent (a low-rank "LoRA" of ``x + (shift(x) - x) * time_maa_x`` adds to each static
  mix), and so is the decay, ``w_t = exp(-exp(time_decay + lora(x_w)))`` per key channel; the state is a matrix
  per head, ``S_t = diag(w_t) S_{t-1} + k_t v_t^T``, read by ``o_t = r_t (S_{t-1} + diag(u) k_t v_t^T)``
  (``zoo.ops.gla`` with the bonus ``u = time_faaaa``); then a group norm per head and a SiLU gate.
- 7: ``S_t = S_{t-1} (diag(w_t) - kk_t (kk_t * a_t)^T) + v_t k_t^T``, ``o_t = S_t r_t`` (``zoo.ops.delta_rule``),
  with decay ``w_t = exp(-e^{-1/2} sigmoid(w0 + lora(x_w)))``, in-context learning rate ``a_t = sigmoid(a0 +
  lora(x_a))``, the removal key ``kk`` the normalised ``k * k_k`` per head, the written key ``k * (1 + (a - 1) *
  k_a)``, and the value residual: each layer after the first mixes its value with the first layer's,
  ``v + (v_first - v) * sigmoid(v0 + lora(x_v))``; then a group norm per head, plus ``(r . (k * r_k)) v`` per head,
  times a low-rank sigmoid gate.

Weights keep the names of BlinkDL's checkpoints (``time_decay``, ``time_maa_w1``, ``w0``, ``k_k``, ...; see
``convert_rwkv.py``), except the time mixing's projections, named as fla names them (``r_proj``, ``k_proj``,
``v_proj``, ``g_proj``, ``o_proj``), and the norms (``ln0`` -> ``model.pre_norm``, ``ln1`` -> ``attn_norm``, ``ln2`` ->
``ffn_norm``, ``ln_out`` -> ``model.norm``).

Decoding keeps per layer the two token-shift inputs and the WKV state: O(1) per token. Padding: a padded position
feeds nothing to the next token's shift, writes nothing into the state (its key is masked) and, in versions 6 and
7, does not decay it, so left-padded rows equal their unpadded runs. Packed documents (position ids restarting at
0) reset the token shift at each document start and run the recurrences as separate sequences (``cu_seqlens``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.rwkv.configuration_rwkv import ZooRwkvConfig
from zoo.models.utils import CACHE_NAME, BackboneInputs, ZooBackbone
from zoo.modules import PackedDocuments, RecurrentCache
from zoo.ops.delta_rule import dplr_delta_rule, dplr_delta_rule_step
from zoo.ops.gla import gla, gla_step
from zoo.ops.wkv4 import wkv4, wkv4_step

# A padded position's key in RWKV-4: exp(key - max) underflows to exactly 0 against any real key.
_MASKED_KEY = -1e4


class SequenceContext:
    """What every mixer of one forward needs about the sequence, beyond its input.

    ``keep`` (B, T, 1) 1.0 at real tokens (None without padding); ``starts`` (B, T, 1) 0.0 where a packed document
    starts, else 1.0 (None when not packed); ``docs`` the packed documents for the ops' ``cu_seqlens``.
    """

    def __init__(self, keep=None, starts=None, docs: PackedDocuments | None = None):
        self.keep, self.starts, self.docs = keep, starts, docs

    @property
    def cu_seqlens(self):
        return self.docs.cu_seqlens if self.docs is not None else None

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, B*T, ...) when packed (the ops take packed documents in one row), else as is."""
        return x.reshape(1, -1, *x.shape[2:]) if self.docs is not None else x

    def unflat(self, x: torch.Tensor, B: int) -> torch.Tensor:
        return x.reshape(B, -1, *x.shape[2:]) if self.docs is not None else x

    def row_states(self, state):
        """Per-document final states -> the state each row goes on from (its last document's)."""
        if self.docs is None or state is None:
            return state
        if isinstance(state, (tuple, list)):
            return type(state)(self.docs.row_states(s) for s in state)
        return self.docs.row_states(state)


def token_shift(x: torch.Tensor, prev: torch.Tensor | None, ctx: SequenceContext) -> torch.Tensor:
    """``x_{t-1}`` for each t (B, T, C): ``prev`` (B, C) before the first token (zero without), zero at document
    starts, and zero after a padded position."""
    src = x * ctx.keep if ctx.keep is not None else x
    first = prev[:, None].to(x.dtype) if prev is not None else torch.zeros_like(x[:, :1])
    shifted = torch.cat([first, src[:, :-1]], dim=1)
    return shifted * ctx.starts if ctx.starts is not None else shifted


def _cat_state(state) -> dict:
    """An op's state as cache entries (the WKV-4 state may be a tuple of numerator, denominator, max)."""
    if isinstance(state, (tuple, list)):
        return {f"wkv{i}": s for i, s in enumerate(state)}
    return {"wkv": state}


def _split_state(cached: dict | None):
    if not cached:
        return None
    if "wkv" in cached:
        return cached["wkv"]
    return tuple(cached[f"wkv{i}"] for i in range(sum(n.startswith("wkv") for n in cached)))


class RwkvTimeMix(nn.Module):
    """The time mixing of one layer; its parameters and recurrence depend on ``config.version``."""

    def __init__(self, config: ZooRwkvConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx, self.version = config, layer_idx, config.version
        C, A = config.hidden_size, config.attention_hidden_size
        self.r_proj = nn.Linear(C, A, bias=False)
        self.k_proj = nn.Linear(C, A, bias=False)
        self.v_proj = nn.Linear(C, A, bias=False)
        self.o_proj = nn.Linear(A, C, bias=False)
        vec = lambda n: nn.Parameter(torch.zeros(n))  # noqa: E731 - initialised in _init_weights
        if self.version == 4:
            self.time_mix_k, self.time_mix_v, self.time_mix_r = vec(C), vec(C), vec(C)
            self.time_decay, self.time_first = vec(A), vec(A)
            return
        H, N = config.num_heads, config.head_size
        self.ln_x = nn.GroupNorm(H, A, eps=config.group_norm_eps)
        if self.version == 6:
            D, Dw = config.proj_low_rank_dim, config.decay_low_rank_dim
            self.g_proj = nn.Linear(C, A, bias=False)
            self.time_maa_x, self.time_maa_w, self.time_maa_k = vec(C), vec(C), vec(C)
            self.time_maa_v, self.time_maa_r, self.time_maa_g = vec(C), vec(C), vec(C)
            self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
            self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
            self.time_decay = vec(A)
            self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dw))
            self.time_decay_w2 = nn.Parameter(torch.zeros(Dw, A))
            self.time_faaaa = nn.Parameter(torch.zeros(H, N))
            return
        Dw, Da, Dv, Dg = (
            config.decay_low_rank_dim,
            config.a_low_rank_dim,
            config.v_low_rank_dim,
            config.gate_low_rank_dim,
        )
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec(C) for _ in range(6))
        self.w0, self.w1, self.w2 = vec(C), nn.Parameter(torch.zeros(C, Dw)), nn.Parameter(torch.zeros(Dw, C))
        self.a0, self.a1, self.a2 = vec(C), nn.Parameter(torch.zeros(C, Da)), nn.Parameter(torch.zeros(Da, C))
        if layer_idx > 0:  # the first layer's value is the residual the others mix in
            self.v0, self.v1, self.v2 = (
                vec(C), nn.Parameter(torch.zeros(C, Dv)), nn.Parameter(torch.zeros(Dv, C))
            )  # fmt: skip
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, Dg)), nn.Parameter(torch.zeros(Dg, C))
        self.k_k, self.k_a = vec(C), vec(C)
        self.r_k = nn.Parameter(torch.zeros(H, N))

    def forward(self, x, ctx: SequenceContext, cached: dict | None, v_first, want_state: bool):
        """``x`` (B, T, C), the normalised input; returns (output, new cache entries or None, v_first)."""
        prev = cached["attn_x"] if cached else None
        shifted = token_shift(x, prev, ctx)
        state = _split_state(cached)
        if self.version == 4:
            out, state = self._wkv4(x, shifted, ctx, state, want_state)
        elif self.version == 6:
            out, state = self._finch(x, shifted, ctx, state, want_state)
        else:
            out, state, v_first = self._goose(x, shifted, ctx, state, want_state, v_first)
        entries = {"attn_x": x[:, -1], **_cat_state(ctx.row_states(state))} if want_state else None
        return out, entries, v_first

    def _wkv4(self, x, shifted, ctx, state, want_state):
        # 1. static token-shift mixes
        xk = x * self.time_mix_k + shifted * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + shifted * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + shifted * (1 - self.time_mix_r)
        k, v, r = self.k_proj(xk).float(), self.v_proj(xv).float(), self.r_proj(xr)  # (B, T, A)
        if ctx.keep is not None:
            k = torch.where(ctx.keep.bool(), k, _MASKED_KEY)
            v = v * ctx.keep
        # 2. WKV with decay w = -exp(time_decay) and bonus u = time_first, per channel
        B, T, _ = x.shape
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()
        if state is not None and T == 1:  # decoding: one recurrent step
            wkv, state = wkv4_step(w, u, k, v, state)
        else:
            wkv, state = wkv4(
                w,
                u,
                ctx.flat(k),
                ctx.flat(v),
                initial_state=state,
                output_final_state=want_state,
                cu_seqlens=ctx.cu_seqlens,
                backend=self.config.backend,
            )
        # 3. receptance gate and output
        return self.o_proj(torch.sigmoid(r) * ctx.unflat(wkv, B).to(r.dtype)), state

    def _finch(self, x, shifted, ctx, state, want_state):
        B, T, _ = x.shape
        H, N = self.config.num_heads, self.config.head_size
        # 1. data-dependent token shift: a low-rank correction to each static mix (w, k, v, r, g)
        delta = shifted - x
        lora = torch.tanh((x + delta * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", lora, self.time_maa_w2).unbind(0)
        xw = x + delta * (self.time_maa_w + mw)
        xk = x + delta * (self.time_maa_k + mk)
        xv = x + delta * (self.time_maa_v + mv)
        xr = x + delta * (self.time_maa_r + mr)
        xg = x + delta * (self.time_maa_g + mg)
        # 2. projections and the data-dependent log decay -exp(time_decay + lora(x_w)), per key channel
        # the recurrence runs in float32 whatever the activations' dtype
        r, k, v = (
            p(t).float().view(B, T, H, N)
            for p, t in ((self.r_proj, xr), (self.k_proj, xk), (self.v_proj, xv))
        )
        g = F.silu(self.g_proj(xg))
        log_decay = -torch.exp(self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2)
        log_decay = log_decay.float().view(B, T, H, N)
        if ctx.keep is not None:  # a padded position writes nothing and does not decay the state
            k = k * ctx.keep[..., None]
            log_decay = log_decay * ctx.keep[..., None]
        # 3. gated linear attention with the bonus u for the current token
        u = self.time_faaaa.float()
        if state is not None and T == 1:  # decoding: one recurrent step
            o, state = gla_step(r, k, v, log_decay, state, u=u, scale=1.0)
        else:
            o, state = gla(
                *(ctx.flat(t) for t in (r, k, v, log_decay)),
                u=u,
                scale=1.0,
                initial_state=state,
                output_final_state=want_state,
                cu_seqlens=ctx.cu_seqlens,
                backend=self.config.backend,
            )
        # 4. group norm per head, SiLU gate, output
        o = self.ln_x(ctx.unflat(o, B).reshape(B * T, H * N).to(self.ln_x.weight.dtype)).view(B, T, H * N)
        return self.o_proj(o.to(g.dtype) * g), state

    def _goose(self, x, shifted, ctx, state, want_state, v_first):
        B, T, C = x.shape
        H, N = self.config.num_heads, self.config.head_size
        # 1. static token-shift mixes, all six in one pass: x + (shifted - x) * mix, (B T, 6, C)
        mixes = torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])
        flat = x.reshape(B * T, 1, C)
        xr, xw, xk, xv, xa, xg = torch.addcmul(flat, shifted.reshape(B * T, 1, C) - flat, mixes).unbind(1)
        # 2. projections; low-rank decay, in-context learning rate and gate (biases added by the products)
        r, k, v = (p(t).view(B, T, C) for p, t in ((self.r_proj, xr), (self.k_proj, xk), (self.v_proj, xv)))
        a = torch.addmm(self.a0, xa @ self.a1, self.a2).sigmoid_().view(B, T, C)
        g = (torch.sigmoid(xg @ self.g1) @ self.g2).view(B, T, C)
        log_decay = torch.addmm(self.w0, torch.tanh(xw @ self.w1), self.w2).float().sigmoid_()
        log_decay = (-math.exp(-0.5) * log_decay).view(B, T, C)
        # 3. removal key (normalised per head) and written key
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * torch.addcmul(1 - self.k_a, a, self.k_a)  # k * (1 + (a - 1) k_a)
        # 4. value residual: every layer after the first mixes in the first layer's value
        if self.layer_idx == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.addmm(self.v0, xv @ self.v1, self.v2).sigmoid_().view(B, T, C))
        # the recurrence runs in float32 whatever the activations' dtype
        heads = lambda t: t.float().view(B, T, H, N)  # noqa: E731
        r, k, v, a, log_decay = heads(r), heads(k), heads(v), heads(a), heads(log_decay)
        kk = kk.float()
        # the rank-one part (-kk)(kk a)^T as kk (-kk a)^T: the sign on the product (in place), not a pass of its own
        b = torch.mul(kk, a).neg_()
        if ctx.keep is not None:  # a padded position leaves the state as it is
            keep = ctx.keep[..., None]
            k, b, log_decay = k * keep, b * keep, log_decay * keep
        # 5. the generalised delta rule S_t = S_{t-1} (diag(w_t) + (-kk_t)(kk_t a_t)^T) + v_t k_t^T, o_t = S_t r_t
        if state is not None and T == 1:  # decoding: one recurrent step
            o, state = dplr_delta_rule_step(r, k, v, kk, b, log_decay, state, scale=1.0)
        else:
            o, state = dplr_delta_rule(
                *(ctx.flat(t) for t in (r, k, v, kk, b, log_decay)),
                scale=1.0,
                initial_state=state,
                output_final_state=want_state,
                cu_seqlens=ctx.cu_seqlens,
                backend=self.config.backend,
            )
        # 6. group norm per head, the current token's bonus (r . (k * r_k)) v, gate, output
        o = self.ln_x(ctx.unflat(o, B).reshape(B * T, C).to(self.ln_x.weight.dtype)).view(B, T, H, N)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True)  # (B, T, H, 1)
        o = torch.addcmul(o.to(v.dtype), bonus, v).view(B, T, C)  # float32, as the recurrence
        return self.o_proj(o.to(g.dtype) * g), state, v_first


class RwkvChannelMix(nn.Module):
    """The channel mixing: ``value(relu(key(x_k))^2)``, gated by ``sigmoid(receptance(x_r))`` before RWKV-7."""

    def __init__(self, config: ZooRwkvConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.version = layer_idx, config.version
        C, F_ = config.hidden_size, config.intermediate_size
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)
        if self.version == 4:
            self.time_mix_k, self.time_mix_r = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        elif self.version == 6:
            self.time_maa_k, self.time_maa_r = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        else:
            self.x_k = nn.Parameter(torch.zeros(C))
        if self.version != 7:
            self.receptance = nn.Linear(C, C, bias=False)

    def forward(self, x, ctx: SequenceContext, cached: dict | None, want_state: bool):
        shifted = token_shift(x, cached["ffn_x"] if cached else None, ctx)
        if self.version == 4:
            xk = x * self.time_mix_k + shifted * (1 - self.time_mix_k)
            xr = x * self.time_mix_r + shifted * (1 - self.time_mix_r)
        elif self.version == 6:
            xk = x + (shifted - x) * self.time_maa_k
            xr = x + (shifted - x) * self.time_maa_r
        else:
            xk = torch.lerp(x, shifted, self.x_k)  # x + (shifted - x) * x_k
        out = self.value(torch.relu(self.key(xk)).square())
        if self.version != 7:
            out = torch.sigmoid(self.receptance(xr)) * out
        return out, ({"ffn_x": x[:, -1]} if want_state else None)


class RwkvBlock(GradientCheckpointingLayer):
    def __init__(self, config: ZooRwkvConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = RwkvTimeMix(config, layer_idx)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.ffn = RwkvChannelMix(config, layer_idx)

    def forward(self, hidden_states, v_first, ctx: SequenceContext, cache: RecurrentCache | None = None):
        cached = cache.get(self.layer_idx) if cache is not None else None
        want_state = cache is not None
        out, attn_state, v_first = self.attn(self.attn_norm(hidden_states), ctx, cached, v_first, want_state)
        hidden_states = hidden_states + out
        out, ffn_state = self.ffn(self.ffn_norm(hidden_states), ctx, cached, want_state)
        if want_state:
            cache.set(self.layer_idx, **attn_state, **ffn_state)
        return hidden_states + out, v_first


class ZooRwkvPreTrainedModel(PreTrainedModel):
    config_class = ZooRwkvConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RwkvBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own RecurrentCache.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (RwkvTimeMix, RwkvChannelMix)):
            # projections at the scale of an orthogonal matrix, as the reference code initialises them (a
            # smaller one leaves RWKV-6's SiLU gate and the squared ReLU of the channel mixing near zero)
            for linear in module.children():
                if isinstance(linear, nn.Linear):
                    init.normal_(linear.weight, std=linear.in_features**-0.5)
        if isinstance(module, RwkvTimeMix):
            _init_time_mix(module, self.config)
        elif isinstance(module, RwkvChannelMix):
            _init_channel_mix(module, self.config)


def _ratios(layer_idx: int, num_layers: int) -> tuple[float, float]:
    """The official initialisations' depth ratios: 0 -> 1 over the layers, and 1 -> almost 0."""
    return layer_idx / max(num_layers - 1, 1), 1.0 - layer_idx / num_layers


def _init_time_mix(m: RwkvTimeMix, cfg: ZooRwkvConfig) -> None:
    """The initialisation of the papers' reference code: mixes ramp over the channels and with depth, decays
    spread from slow to fast over the channels."""
    r0, r1 = _ratios(m.layer_idx, cfg.num_hidden_layers)
    C, A = cfg.hidden_size, cfg.attention_hidden_size
    ddd = torch.arange(C, dtype=torch.float32) / C
    n = torch.arange(A, dtype=torch.float32) / max(A - 1, 1)
    if m.version == 4:
        init.copy_(m.time_decay, -5 + 8 * n ** (0.7 + 1.3 * r0))
        zigzag = ((torch.arange(A) + 1) % 3 - 1) * 0.5
        init.copy_(m.time_first, torch.full((A,), math.log(0.3)) + zigzag)
        init.copy_(m.time_mix_k, ddd**r1)
        init.copy_(m.time_mix_v, ddd**r1 + 0.3 * r0)
        init.copy_(m.time_mix_r, ddd ** (0.5 * r1))
        return
    H = cfg.num_heads
    # RWKV-7 scales the output norm up with depth
    gain = 1.0 if m.version == 6 else ((1 + m.layer_idx) / cfg.num_hidden_layers) ** 0.7
    init.constant_(m.ln_x.weight, gain)
    init.zeros_(m.ln_x.bias)
    if m.version == 6:
        for p, power in ((m.time_maa_x, r1), (m.time_maa_w, r1), (m.time_maa_k, r1), (m.time_maa_r, 0.5 * r1),
                         (m.time_maa_g, 0.5 * r1)):  # fmt: skip
            init.copy_(p, 1 - ddd**power)
        init.copy_(m.time_maa_v, 1 - (ddd**r1 + 0.3 * r0))
        init.uniform_(m.time_maa_w1, -1e-4, 1e-4)
        init.uniform_(m.time_maa_w2, -1e-4, 1e-4)
        init.copy_(m.time_decay, -6 + 5 * n ** (0.7 + 1.3 * r0))
        init.zeros_(m.time_decay_w1)
        init.uniform_(m.time_decay_w2, -1e-2, 1e-2)
        zigzag = ((torch.arange(A) + 1) % 3 - 1) * 0.1
        init.copy_(m.time_faaaa, (r0 * (1 - n) + zigzag).view(H, -1))
        return
    for p, power in ((m.x_r, 0.2), (m.x_w, 0.9), (m.x_k, 0.7), (m.x_v, 0.7), (m.x_a, 0.9), (m.x_g, 0.2)):
        init.copy_(p, 1 - ddd ** (power * r1))
    init.copy_(m.w0, -7 + 5 * n ** (0.85 + r0**0.5) + 0.5)
    init.zeros_(m.a0)
    for first, second in ((m.w1, m.w2), (m.a1, m.a2), (m.g1, m.g2)):
        init.zeros_(first)
        init.normal_(second, std=0.1 / math.sqrt(second.shape[0]))
    if m.layer_idx > 0:
        init.ones_(m.v0)
        init.zeros_(m.v1)
        init.normal_(m.v2, std=0.1 / math.sqrt(m.v2.shape[0]))
    init.constant_(m.k_k, 0.85)
    init.ones_(m.k_a)
    init.zeros_(m.r_k)


def _init_channel_mix(m: RwkvChannelMix, cfg: ZooRwkvConfig) -> None:
    _, r1 = _ratios(m.layer_idx, cfg.num_hidden_layers)
    ddd = torch.arange(cfg.hidden_size, dtype=torch.float32) / cfg.hidden_size
    if m.version == 4:
        init.copy_(m.time_mix_k, ddd**r1)
        init.copy_(m.time_mix_r, ddd**r1)
    elif m.version == 6:
        init.copy_(m.time_maa_k, 1 - ddd**r1)
        init.copy_(m.time_maa_r, 1 - ddd**r1)
    else:
        init.copy_(m.x_k, 1 - ddd ** (r1**4))


class ZooRwkvModel(ZooBackbone, ZooRwkvPreTrainedModel):
    cache_class = RecurrentCache

    def __init__(self, config: ZooRwkvConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.layers = nn.ModuleList(RwkvBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def new_cache(self):
        return RecurrentCache(self.config.num_hidden_layers)

    def layers_forward(self, inputs: BackboneInputs, output_hidden_states: bool):
        hidden_states, cache = inputs.embeds, inputs.cache
        T = hidden_states.shape[1]
        keep = inputs.pad_mask[:, -T:, None].to(hidden_states.dtype) if inputs.pad_mask is not None else None
        ctx = SequenceContext(keep=keep)
        if inputs.packed:
            ctx.docs = PackedDocuments.from_position_ids(inputs.position_ids)
            ctx.starts = (~inputs.doc_starts)[..., None].to(hidden_states.dtype)
        hidden_states = self.pre_norm(hidden_states)
        v_first = None
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, v_first = layer(hidden_states, v_first, ctx, cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class ZooRwkvForCausalLM(CausalLMHead, ZooRwkvPreTrainedModel, GenerationMixin):
    backbone_class = ZooRwkvModel


class ZooRwkvForSequenceClassification(SequenceClassificationHead, ZooRwkvPreTrainedModel):
    backbone_class = ZooRwkvModel


__all__ = [
    "RwkvBlock",
    "RwkvChannelMix",
    "ZooRwkvForCausalLM",
    "ZooRwkvForSequenceClassification",
    "ZooRwkvModel",
    "ZooRwkvPreTrainedModel",
    "RwkvTimeMix",
]
