"""Hyena: attention-free language models of gated implicit long convolutions (Poli et al., 2023, "Hyena Hierarchy:
Towards Larger Convolutional Language Models", arXiv:2302.10866; HyenaDNA, Nguyen et al., 2023, arXiv:2306.15794).

Each block is ``x + mixer(norm1(x))`` then ``x + mlp(norm2(x))``. The mixer (``HyenaOperator``) of order N, width
d, on the parametrisation of the reference ``HyenaOperator`` / ``HyenaFilter`` (HazyResearch safari,
``src/models/sequence/hyena.py``), per token t:

    x_0, ..., x_{N-1}, v = split(short_conv(in_proj(u)), d)     (N + 1) d channels; causal depthwise conv of width 3
    h_o[j]  = filter_fn(j)                                       N - 1 implicit filters of d channels (below)
    for o, x_i in enumerate(x_{N-1}, ..., x_1):                  gating, then a long convolution with skip bias_o
        v = long_conv(v * x_i, h_o) + bias_o * (v * x_i)
    y = out_proj(v * x_0)

The implicit filter of position j (``HyenaFilter``), d (N - 1) channels at once:

    z_j   = [t_j, Re exp(-i f w_j), Im exp(-i f w_j)]           t_j = j / (l_max - 1), w_j = 2 pi j / l_max,
                                                                 f = linspace(1e-4, bands - 1, bands)
    h[j]  = Linear(... sin(freq * Linear(sin(freq * Linear(z_j)))) ...)     one ``freq`` shared by every sine
    h[j] /= sum_c |h[j, c]|                                      only with filter_normalized, before the window
    h[j] *= exp(-t_j |deltas|) + shift                           the decay window, one rate per channel

Filter channel c = v (N - 1) + o belongs to long convolution o and inner channel v (the reference's ``(v o)``
layout), as do the skip biases. Parameter names are the reference's, so that a safari or HyenaDNA checkpoint
loads by renaming (``convert_hyena.py``): ``in_proj``, ``out_proj``, ``short_filter`` (a depthwise ``Conv1d``),
``filter_fn.bias``, ``filter_fn.pos_emb.z`` (a parameter) and ``.t`` (a buffer), ``filter_fn.implicit_filter.{0,
1, 2, 4, ...}`` (linear layers at even indices, the one shared ``Sin`` at index 1), ``filter_fn.modulation.deltas``
(a buffer).

Lengths. The filters are evaluated at positions 0 .. T - 1 for a length-T input; their values do not depend on T,
so a prefix and its continuation see the same filter. Past the position grid (``max_position_embeddings``) the
features are extended by their formula (``filter_extension="extrapolate"``) or refused (``"error"``).

Decoding keeps, per layer, the last inputs of the short convolution and the whole input history of each long
convolution (exact: every past input meets its own filter tap; O(T) per token). ``distill_recurrence`` fits each
filter with a small diagonal state-space model (Massaroli et al., 2023, "Laughing Hyena Distillery: Extracting
Compact Recurrences From Convolutions", arXiv:2310.18780), after which decoding keeps a fixed-size state: O(1) per
token. Padding zeroes the convolutions' inputs at padded positions (a convolution is shift-invariant, so left
padding leaves the outputs unchanged); packed documents (position ids restarting at 0) run as separate sequences
in one op call (``cu_seqlens``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.heads import CausalLMHead, SequenceClassificationHead
from zoo.models.hyena.configuration_hyena import HyenaConfig
from zoo.models.utils import CACHE_NAME, BackboneInputs, ZooBackbone
from zoo.modules import MLP, PackedDocuments, RecurrentCache
from zoo.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from zoo.ops.long_conv import long_conv, long_conv_step


class Sin(nn.Module):
    """sin(freq * x) with a learnable frequency per feature (shared by every layer of the filter network)."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), float(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


def positional_features(
    emb_dim: int, grid: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The filter network's input at ``positions`` (float64, (L,)) on a grid of ``grid`` positions: z (1, L, emb_dim)
    = [t, cos(f w), -sin(f w)] and t (1, L, 1), in float64."""
    bands = (emb_dim - 1) // 2
    t = positions / (grid - 1)
    w = 2 * math.pi * positions / grid
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64, device=positions.device)
    angle = f[None, :] * w[:, None]  # (L, bands)
    z = torch.cat([t[:, None], torch.cos(angle), -torch.sin(angle)], dim=-1)
    return z[None], t[None, :, None]


class PositionalEmbedding(nn.Module):
    """Positional features on the grid of ``seq_len`` positions: ``z`` (trained, as in the reference) and ``t``."""

    def __init__(self, emb_dim: int, seq_len: int):
        super().__init__()
        self.emb_dim, self.seq_len = emb_dim, seq_len
        z, t = self.initial()
        self.z = nn.Parameter(z)  # (1, seq_len, emb_dim)
        self.register_buffer("t", t)  # (1, seq_len, 1)

    def initial(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The features at initialisation, in float32 (time from ``torch.linspace`` as the reference makes it)."""
        positions = torch.arange(self.seq_len, dtype=torch.float64, device="cpu")
        z, _ = positional_features(self.emb_dim, self.seq_len, positions)
        t = torch.linspace(0, 1, self.seq_len, device="cpu")[None, :, None]
        return torch.cat([t, z[..., 1:].float()], dim=-1), t

    def forward(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        if L <= self.seq_len:
            return self.z[:, :L], self.t[:, :L]
        # the documented extension: the same features on a longer grid (positions seq_len .. L - 1)
        positions = torch.arange(self.seq_len, L, dtype=torch.float64, device=self.t.device)
        z_more, t_more = positional_features(self.emb_dim, self.seq_len, positions)
        z = torch.cat([self.z, z_more.to(self.z.dtype)], dim=1)
        return z, torch.cat([self.t, t_more.to(self.t.dtype)], dim=1)


class ExponentialModulation(nn.Module):
    """The decay window exp(-t |deltas|) + shift, one rate per channel, from log(target) / slow to
    log(target) / fast."""

    def __init__(self, d_filter: int, config: HyenaConfig):
        super().__init__()
        self.modulate, self.shift = config.filter_modulate, config.filter_decay_shift
        self.fast, self.slow, self.target = (
            config.filter_fast_decay_pct, config.filter_slow_decay_pct, config.filter_decay_target,
        )  # fmt: skip
        self.register_buffer("deltas", self.initial(d_filter))  # (1, 1, d_filter)

    def initial(self, d_filter: int) -> torch.Tensor:
        low, high = math.log(self.target) / self.slow, math.log(self.target) / self.fast
        return torch.linspace(low, high, d_filter, device="cpu")[None, None]

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if not self.modulate:
            return h
        return h * (torch.exp(-t * self.deltas.abs()) + self.shift)


class ImplicitFilter(nn.Module):
    """The filter network z -> h: Linear, Sin, (Linear, Sin) x inner, Linear without bias. The linear layers sit at
    the reference's ``nn.Sequential`` indices 0, 2, 4, ...; its one ``Sin`` (repeated there at every odd index)
    is held once, at index 1."""

    def __init__(self, emb_dim: int, width: int, d_filter: int, inner: int, w: float):
        super().__init__()
        self.add_module("0", nn.Linear(emb_dim, width))
        self.add_module("1", Sin(width, w))
        for i in range(inner):
            self.add_module(str(2 * i + 2), nn.Linear(width, width))
        self.add_module(str(2 * inner + 2), nn.Linear(width, d_filter, bias=False))
        self.num_layers = inner + 2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        act = self._modules["1"]
        for i in range(self.num_layers - 1):
            z = act(self._modules[str(2 * i)](z))
        return self._modules[str(2 * self.num_layers - 2)](z)


class HyenaFilter(nn.Module):
    """The implicit long filters of one operator: ``filter(L)`` -> (L, d_filter), and their skip weights ``bias``."""

    def __init__(self, d_filter: int, config: HyenaConfig):
        super().__init__()
        self.config = config
        self.d_filter = d_filter
        self.bias = nn.Parameter(torch.randn(d_filter))
        self.pos_emb = PositionalEmbedding(config.emb_dim, config.max_position_embeddings)
        self.implicit_filter = ImplicitFilter(
            config.emb_dim, config.filter_order, d_filter, config.filter_inner_layers, config.filter_sin_freq
        )
        self.modulation = ExponentialModulation(d_filter, config)

    def filter(self, L: int) -> torch.Tensor:
        if L > self.config.max_position_embeddings and self.config.filter_extension == "error":
            raise ValueError(
                f"a sequence of {L} positions is longer than the filters' grid, max_position_embeddings="
                f"{self.config.max_position_embeddings}; set filter_extension='extrapolate' to extend the grid"
            )
        z, t = self.pos_emb(L)
        h = self.implicit_filter(z)
        if self.config.filter_normalized:
            # as the reference: each position's values over the channels divided by their L1 norm, before the
            # decay window (after it, the division would undo most of the window's decay over time)
            h = h / h.abs().sum(-1, keepdim=True)
        return self.modulation(t, h)[0]  # (L, d_filter)


class HyenaOperator(nn.Module):
    """The Hyena mixer (B, L, D) -> (B, L, D); see the module docstring."""

    def __init__(self, config: HyenaConfig, layer_idx: int = 0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d, N, K = config.hidden_size, config.order, config.short_filter_order
        self.d_model, self.order = d, N
        self.in_proj = nn.Linear(d, (N + 1) * d)
        self.out_proj = nn.Linear(d, d)
        # nn.Conv1d only to hold the weight in the reference's layout ((N + 1) d, 1, K); the op convolves
        self.short_filter = nn.Conv1d((N + 1) * d, (N + 1) * d, K, groups=(N + 1) * d, padding=K - 1)
        self.filter_fn = HyenaFilter(d * (N - 1), config)
        # set by ``HyenaForCausalLM.distill_recurrence``: the filters as diagonal state-space models
        self.distilled: dict[str, torch.Tensor] | None = None

    def filters(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The N - 1 long filters (N - 1, d, L) and their skip weights (N - 1, d), from the ``(v o)`` layout."""
        d, n = self.d_model, self.order - 1
        h = self.filter_fn.filter(L).reshape(L, d, n).permute(2, 1, 0)
        bias = self.filter_fn.bias.reshape(d, n).t()
        if not self.config.filter_bias:
            bias = torch.zeros_like(bias)
        return h, bias

    def forward(
        self, u, pad_mask=None, docs: PackedDocuments | None = None, cache: RecurrentCache | None = None
    ):
        """``u`` (B, T, D); ``pad_mask`` (B, T) 1 = real token; ``docs``: packed documents (B = 1)."""
        B, T, d = u.shape
        keep = pad_mask.to(u.dtype)[:, :, None] if pad_mask is not None else None
        cached = cache.get(self.layer_idx) if cache is not None else None
        step = cached is not None and T == 1
        cu_seqlens = docs.cu_seqlens if docs is not None else None
        # 1. input projection, zeroed at padding
        z = self.in_proj(u)  # (B, T, (N + 1) d)
        if keep is not None:
            z = z * keep
        # 2. short causal depthwise convolution
        weight, bias = self.short_filter.weight[:, 0], self.short_filter.bias
        conv_state = cached["conv"] if cached else None
        if step:
            uc, conv_state = causal_conv1d_step(z[:, 0], weight, bias, conv_state)
            uc = uc[:, None]
        else:
            uc, conv_state = causal_conv1d(
                z, weight, bias, initial_state=conv_state, output_final_state=cache is not None,
                cu_seqlens=cu_seqlens, backend=self.config.backend,
            )  # fmt: skip
        if keep is not None:
            uc = uc * keep
        *x, v = uc.split(d, dim=-1)
        # 3. gated long convolutions, the last projection first
        if self.distilled is not None and cache is not None:
            v, new_state = self._distilled_recurrence(x, v, cached, docs)
        else:
            v, new_state = self._long_convolutions(x, v, cached, step, cu_seqlens, docs, cache is not None)
        if cache is not None:
            if docs is not None:
                conv_state = docs.row_states(conv_state)
            cache.set(self.layer_idx, conv=conv_state, **new_state)
        # 4. output gate and projection
        return self.out_proj(v * x[0])

    def _long_convolutions(self, x, v, cached, step, cu_seqlens, docs, keep_history):
        B, T, d = v.shape
        past = cached["history"] if cached else None  # (B, N - 1, d, S)
        S = past.shape[-1] if past is not None else 0
        h, skip = self.filters(S + T)
        histories = []
        for o, x_i in enumerate(reversed(x[1:])):
            v = v * x_i
            h0 = past[:, o] if past is not None else None
            if step:
                y = long_conv_step(v[:, 0], h[o], skip[o], h0)[0][:, None]
            else:
                y = long_conv(
                    v, h[o], skip[o], initial_state=h0, cu_seqlens=cu_seqlens, backend=self.config.backend
                )[0]
            if keep_history:
                histories.append(self._history(v, h0, docs))
            v = y
        return v, ({"history": torch.stack(histories, 1)} if keep_history else {})

    @staticmethod
    def _history(v, past, docs):
        """The inputs of a long convolution so far, (B, d, S + T); after packed documents, each row's last one
        only (the earlier positions zeroed: zeros add nothing to a convolution)."""
        new = v.transpose(1, 2)
        if docs is not None:
            rows = docs.last.numel()
            T = v.shape[1] // rows
            start = docs.cu_seqlens[docs.last] - torch.arange(rows, device=v.device) * T  # (rows,)
            new = new.reshape(v.shape[2], rows, T).transpose(0, 1)  # (rows, d, T)
            new = new * (torch.arange(T, device=v.device) >= start[:, None])[:, None, :]
        return new if past is None else torch.cat([past, new], dim=-1)

    def _distilled_recurrence(self, x, v, cached, docs):
        """The long convolutions by the distilled diagonal recurrences (``distill_recurrence``), per channel with
        state x_t = A x_{t-1} + v_{t-1} (n complex modes): y_t = h[0] v_t + Re(R . x_t) + bias v_t."""
        if docs is not None:
            raise ValueError("decoding with distilled recurrences does not take packed documents")
        A, R, h0 = self.distilled["A"], self.distilled["R"], self.distilled["h0"]  # (N-1, d, n) x2, (N-1, d)
        _, skip = self.filters(1)
        B, T, d = v.shape
        state = cached["ssm"] if cached else v.new_zeros(B, *A.shape, dtype=A.dtype)  # (B, N - 1, d, n)
        new_states = []
        for o, x_i in enumerate(reversed(x[1:])):
            v = v * x_i
            s, ys = state[:, o], []
            for t in range(T):
                v_t = v[:, t]  # (B, d)
                ys.append((R[o] * s).sum(-1).real.to(v.dtype) + (h0[o] + skip[o]) * v_t)
                s = A[o] * s + v_t[..., None]
            new_states.append(s)
            v = torch.stack(ys, 1)
        return v, {"ssm": torch.stack(new_states, 1)}


# Hankel matrices of the fit are formed for this many sequences at a time (each rows x cols float64), so that
# memory stays near FIT_BATCH_BYTES whatever the number of channels and the fitted length
FIT_BATCH_BYTES = 256 * 2**20


def _leading_left_vectors(H: torch.Tensor, n: int, oversample: int = 10, power: int = 2) -> torch.Tensor:
    """The n leading left singular vectors of H (..., rows, cols), by a randomized range finder with power
    iterations (Halko, Martinsson & Tropp 2011, arXiv:0909.4061, algorithms 4.4 and 5.1): the Hankel matrices of
    smooth filters have fast-decaying spectra, where this matches the full SVD's leading subspace to rounding,
    at O(rows cols n) instead of O(rows cols^2). Deterministic (a fixed generator)."""
    k = min(n + oversample, *H.shape[-2:])
    gen = torch.Generator().manual_seed(0)
    omega = torch.randn(H.shape[-1], k, generator=gen, dtype=H.dtype).to(H.device)
    Y = torch.linalg.qr(H @ omega).Q
    for _ in range(power):
        Z = torch.linalg.qr(H.transpose(-1, -2) @ Y).Q
        Y = torch.linalg.qr(H @ Z).Q
    Ub = torch.linalg.svd(Y.transpose(-1, -2) @ H, full_matrices=False)[0]  # (..., k, k)
    return (Y @ Ub)[..., :n]


def fit_modes(g: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal modes of sequences g (..., M) (Massaroli et al. 2023, modal interpolation): g_j ~ Re(sum_k R_k
    A_k^j). The poles A from the shift invariance of the Hankel matrix's leading n singular vectors (clamped into
    the unit disc, so that the recurrence cannot blow up), the residues R by least squares. Complex128. The Hankel
    matrices (M / 2 x M / 2 per sequence) are formed a batch of sequences at a time (``FIT_BATCH_BYTES``); their
    leading vectors come from ``_leading_left_vectors``."""
    M = g.shape[-1]
    lead = g.shape[:-1]
    g = g.double().reshape(-1, M)
    rows = max(n + 1, M // 2)
    cols = M - rows + 1
    idx = torch.arange(rows, device=g.device)[:, None] + torch.arange(cols, device=g.device)  # Hankel indices
    per_batch = max(1, FIT_BATCH_BYTES // (rows * cols * 8))
    U = torch.cat(
        [_leading_left_vectors(g[i : i + per_batch][:, idx], n) for i in range(0, g.shape[0], per_batch)]
    )  # (S, rows, n)
    shift = torch.linalg.lstsq(U[..., :-1, :], U[..., 1:, :]).solution  # (S, n, n)
    A = torch.linalg.eigvals(shift)  # (S, n)
    A = A / A.abs().clamp(min=1.0)
    V = A[..., None, :] ** torch.arange(M, dtype=torch.float64, device=A.device)[:, None]  # (S, M, n)
    R = torch.linalg.lstsq(V, g.to(V.dtype)[..., None]).solution[..., 0]  # (S, n)
    return A.reshape(*lead, n), R.reshape(*lead, n)


class HyenaBlock(GradientCheckpointingLayer):
    def __init__(self, config: HyenaConfig, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = HyenaOperator(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, act=config.hidden_act, bias=True)

    def forward(self, hidden_states, pad_mask=None, docs=None, cache=None):
        hidden_states = hidden_states + self.mixer(self.norm1(hidden_states), pad_mask, docs, cache)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class HyenaPreTrainedModel(PreTrainedModel):
    config_class = HyenaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HyenaBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own RecurrentCache.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference language model's scheme: every linear layer (the filter networks' included) and the
        embedding normal(0, initializer_range), biases zero, the residual outputs scaled by 1 / sqrt(2 layers);
        the filters' positional features, decay rates, sine frequencies and standard-normal skip weights as the
        reference makes them; the short convolution as PyTorch's default."""
        cfg = self.config
        std = cfg.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, Sin):
            init.constant_(module.freq, cfg.filter_sin_freq)
        elif isinstance(module, PositionalEmbedding):
            z, t = module.initial()
            init.copy_(module.z, z)
            init.copy_(module.t, t)
        elif isinstance(module, ExponentialModulation):
            init.copy_(module.deltas, module.initial(module.deltas.shape[-1]))
        elif isinstance(module, HyenaFilter):
            init.normal_(module.bias, mean=0.0, std=1.0)
        if cfg.rescale_prenorm_residual and isinstance(module, (HyenaOperator, MLP)):
            out = module.out_proj if isinstance(module, HyenaOperator) else module.down_proj
            init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * cfg.num_hidden_layers))


class HyenaModel(ZooBackbone, HyenaPreTrainedModel):
    cache_class = RecurrentCache

    def __init__(self, config: HyenaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HyenaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
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
        hidden_states = self.norm(hidden_states).reshape(B, T, -1)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class HyenaForCausalLM(CausalLMHead, HyenaPreTrainedModel, GenerationMixin):
    backbone_class = HyenaModel

    @torch.no_grad()
    def distill_recurrence(self, state_dim: int, length: int | None = None) -> list[float]:
        """Fit every long filter with a diagonal state-space recurrence of ``state_dim`` complex modes, after
        "Laughing Hyena Distillery" (Massaroli et al., 2023, arXiv:2310.18780): h[j] ~ Re(sum_k R_k A_k^(j-1)) for
        j >= 1 over the first ``length`` taps (default: the position grid), h[0] kept exactly. From then on,
        decoding with a cache runs the recurrences (a fixed (N - 1, d, state_dim) state per layer, O(1) per token);
        a forward without a cache still runs the exact convolutions. Returns each layer's relative fit error
        ||h_fit - h|| / ||h|| over the fitted taps. The fit is not saved with the model; call it again after
        loading (``undistill_recurrence`` returns to the exact cache)."""
        if state_dim < 1:
            raise ValueError(f"distill_recurrence: state_dim={state_dim} must be positive")
        L = length or self.config.max_position_embeddings
        if L < 2 * state_dim + 2:
            raise ValueError(
                f"distill_recurrence: length={L} must be at least 2 * state_dim + 2 = {2 * state_dim + 2}"
            )
        errors = []
        for layer in self.model.layers:
            mixer = layer.mixer
            h, _ = mixer.filters(L)  # (N - 1, d, L)
            A, R = fit_modes(h[..., 1:], state_dim)
            V = A[..., None, :] ** torch.arange(L - 1, dtype=torch.float64, device=A.device)[:, None]
            fit = (V @ R[..., None])[..., 0].real
            target = h[..., 1:].double()
            errors.append(float((fit - target).norm() / target.norm().clamp(min=1e-30)))
            complex_dtype = torch.complex128 if h.dtype == torch.float64 else torch.complex64
            mixer.distilled = {"A": A.to(complex_dtype), "R": R.to(complex_dtype), "h0": h[..., 0]}
        return errors

    def undistill_recurrence(self) -> None:
        """Back to the exact cache of every long convolution's inputs."""
        for layer in self.model.layers:
            layer.mixer.distilled = None


class HyenaForSequenceClassification(SequenceClassificationHead, HyenaPreTrainedModel):
    backbone_class = HyenaModel


__all__ = [
    "HyenaForCausalLM",
    "HyenaForSequenceClassification",
    "HyenaModel",
    "HyenaOperator",
    "HyenaPreTrainedModel",
]
