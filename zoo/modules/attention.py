"""Multi-head attention through transformers' attention interface, shared by every zoo model that attends.

Causal or bidirectional, optional sliding window, grouped-query heads (Ainslie et al., 2023, "GQA"), rotary or
ALiBi (Press et al., 2022, "Train Short, Test Long") positions, a key/value cache, and packed documents: a restart
of ``position_ids`` to 0 starts a new document that attends to nothing before it.

The kernel is the one ``config._attn_implementation`` names (``attn_implementation=`` in ``from_pretrained`` /
``from_config``, or ``model.set_attn_implementation``), looked up in transformers' ``ALL_ATTENTION_FUNCTIONS``:
``sdpa`` (the default), ``eager`` (transformers' reference), ``flash_attention_2`` or any function registered
with ``transformers.AttentionInterface``. The mask is built once per forward as a boolean (B, 1, T, kv) tensor
by ``transformers.masking_utils`` (``sdpa_mask`` over its causal, bidirectional, sliding-window and packed-sequence
mask functions) and handed to each kernel in the form it takes (boolean for sdpa, additive for eager). ALiBi's
per-head distance bias is added here: masking_utils builds boolean patterns only. Kernels that take
no dense mask (flash attention, registered functions) are refused when one is needed (padding, packed documents,
ALiBi, a sliding window) rather than silently ignoring it. ``flex_attention`` is not offered: transformers' flex
path crashed the process on this CPU build of torch (2.13).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    packed_sequence_mask_function,
    sdpa_mask,
    sliding_window_bidirectional_overlay,
    sliding_window_overlay,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from zoo.modules.rotary import apply_rotary

# Kernels that take a dense (B, 1, T, kv) mask, and whether it is additive (float) rather than boolean.
DENSE_MASK_KERNELS = {"sdpa": False, "eager": True}


# On a CPU, torch's flash-attention kernel in bfloat16 / float16 has a large fixed cost per (batch, head) pair in
# its backward: forward + backward over 32 pairs of 88 tokens took 4.3 ms against 2.0 ms in float32 (AMD EPYC with
# AVX512-BF16, torch 2.13, two threads), 5.2 against 4.4 ms at 256 tokens, about equal at 512 and the half kernel
# faster beyond. So on a CPU, attention in a half dtype (its inputs', or CPU autocast's, which casts SDPA's inputs)
# over fewer keys than this runs in float32, with or without gradients (a checkpointed layer recomputes the same).
CPU_HALF_ATTENTION_MIN_KEYS = 512
HALF_DTYPES = (torch.bfloat16, torch.float16)


def cpu_float_inputs(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
    """(q, k, v, context) for the ``impl`` kernel: on a CPU, for sdpa in a half dtype (q's, or that of CPU autocast,
    which would cast SDPA's inputs back) over fewer than ``CPU_HALF_ATTENTION_MIN_KEYS`` keys, float32 inputs and
    autocast off for the call; else the inputs as they are and no context."""
    half = q.dtype in HALF_DTYPES or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in HALF_DTYPES
    )
    if impl != "sdpa" or q.device.type != "cpu" or kv_len >= CPU_HALF_ATTENTION_MIN_KEYS or not half:
        return q, k, v, contextlib.nullcontext()
    return q.float(), k.float(), v.float(), torch.autocast("cpu", enabled=False)


def attention_function(name: str | None):
    """The attention kernel ``config._attn_implementation`` names (``None``: sdpa)."""
    name = name or "sdpa"
    if name == "eager":
        return eager_attention_forward
    if name not in ALL_ATTENTION_FUNCTIONS:
        known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
        raise ValueError(f"attn_implementation={name!r} is not one of {known}")
    return ALL_ATTENTION_FUNCTIONS[name]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: a geometric sequence from 2^(-8/n); non-powers of two interleave the next power."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


def attention_mask_function(
    *, causal: bool = True, sliding_window: int | None = None, doc_ids: torch.Tensor | None = None
):
    """The ``(batch, head, q, kv) -> allowed`` rule of ``transformers.masking_utils`` for this attention.

    Causal or bidirectional, intersected with a sliding window of ``sliding_window`` tokens counting the query
    itself, and with packed documents (``doc_ids`` ``(B, T)``, indexed by absolute query and key position).
    """
    parts = [causal_mask_function if causal else bidirectional_mask_function]
    if sliding_window is not None:
        # transformers' bidirectional overlay keeps |q - k| <= w where its causal one keeps q - k < w; w - 1 gives
        # both directions zoo's one meaning (a window of w tokens including the query)
        parts.append(
            sliding_window_overlay(sliding_window)
            if causal
            else sliding_window_bidirectional_overlay(sliding_window - 1)
        )
    if doc_ids is not None:
        parts.append(packed_sequence_mask_function(doc_ids))
    return and_masks(*parts) if len(parts) > 1 else parts[0]


def build_attention_mask(
    *,
    batch_size: int,
    q_len: int,
    past_len: int,
    device: torch.device,
    causal: bool = True,
    padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask ``(B, 1, q_len, past_len + q_len)``, True where a query may attend a key.

    Returns ``None`` when plain causal (or full) attention is exact, so SDPA can take its fastest path.
    ``padding_mask`` is the usual 2D ``attention_mask`` over past and current tokens (1 = real token).
    ``doc_ids`` ``(B, q_len)`` separates packed documents (only used without a past).
    Rows with no allowed key (padding queries) are opened fully so that no NaN is produced; their outputs are
    never used.

    Built by ``transformers.masking_utils.sdpa_mask`` from :func:`attention_mask_function`, which also decides
    when no mask is needed. Its ``create_causal_mask`` family does not fit: it finds packed documents by its own
    rule (a jump in ``position_ids``) and only without a cache, where zoo's rule is a restart at 0
    (``zoo.modules.documents``) with the cache on or off.
    """
    kv_len = past_len + q_len
    if doc_ids is not None and past_len > 0:
        doc_ids = None
    # Whether several documents are present depends on the data; a compiled graph cannot branch on that, so
    # under torch.compile given doc_ids always build the mask (sdpa_mask does the same for a padding mask).
    if (
        doc_ids is not None
        and not torch.compiler.is_compiling()
        and not bool((doc_ids != doc_ids[:, :1]).any())
    ):
        doc_ids = None
    if padding_mask is not None:
        padding_mask = padding_mask[:, -kv_len:].to(device=device, dtype=torch.bool)
    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=past_len,
        mask_function=attention_mask_function(causal=causal, sliding_window=sliding_window, doc_ids=doc_ids),
        attention_mask=padding_mask,
        local_size=sliding_window,
        allow_is_causal_skip=causal and doc_ids is None,
        allow_is_bidirectional_skip=not causal and doc_ids is None,
        device=device,
    )
    if mask is None:
        return None
    return mask | ~mask.any(-1, keepdim=True)


# Decoding with a cache gives SDPA a new key length at every step. On a GPU, PyTorch may send SDPA to cuDNN's kernel
# first, and cuDNN builds an execution plan for every shape it has not seen (tens of milliseconds each): the baseline
# transformer decoded at a constant ~65 ms per token on an H200 (torch 2.11). Decoding on CUDA therefore uses the
# other kernels, which need no plan.
DECODE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def decode_kernels(q: torch.Tensor, past_len: int):
    """The context in which attention over a growing cache runs: SDPA without cuDNN on CUDA, unchanged elsewhere."""
    if q.is_cuda and past_len > 0:
        return sdpa_kernel(list(DECODE_SDPA_BACKENDS))
    return contextlib.nullcontext()


class Attention(nn.Module):
    """``o_proj(softmax(q kᵀ / sqrt(d) + bias) v)`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` projections."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        layer_idx: int = 0,
        causal: bool = True,
        sliding_window: int | None = None,
        bias: bool = False,
        out_bias: bool | None = None,
        dropout: float = 0.0,
        alibi: bool = False,
        config=None,
    ):
        """``config``: the model's config, read at each call for ``_attn_implementation``."""
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        self.head_dim = head_dim or hidden_size // num_heads
        self.num_key_value_groups = num_heads // self.num_kv_heads  # read by transformers' kernels
        self.layer_idx = layer_idx
        self.causal = causal
        self.is_causal = causal  # read by transformers' kernels
        self.sliding_window = sliding_window
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(
            num_heads * self.head_dim, hidden_size, bias=bias if out_bias is None else out_bias
        )
        # ALiBi's slopes are computed at each call, not kept as a buffer: transformers' loading leaves a
        # non-persistent buffer it does not know empty (zeros), which silently removed the bias after
        # ``from_pretrained``
        self.alibi = alibi

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """``hidden_states`` (B, T, C); ``attention_mask`` from :func:`build_attention_mask` (or None)."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        past_len = 0
        if cache is not None:
            past_len = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)

        # A sliding-window cache (transformers' DynamicSlidingWindowLayer) holds only the latest keys: the
        # ``kv_len`` keys here are positions key_start ... past_len + T - 1, the mask's last kv_len columns.
        kv_len = k.shape[2]
        key_start = past_len + T - kv_len
        mask = attention_mask
        if mask is None and self.sliding_window is not None and past_len + T > self.sliding_window:
            mask = build_attention_mask(
                batch_size=B,
                q_len=T,
                past_len=past_len,
                device=q.device,
                causal=self.causal,
                sliding_window=self.sliding_window,
            )
        if mask is not None and mask.shape[-1] != kv_len:
            mask = mask[..., -kv_len:]
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        additive = DENSE_MASK_KERNELS.get(impl)
        out_dtype = q.dtype
        q, k, v, kernel_dtype = cpu_float_inputs(impl, q, k, v, kv_len)
        if self.alibi or (additive and mask is None and self.causal and T > 1):
            # ALiBi is an additive bias, and the eager kernel applies no causal mask of its own: both
            # need the mask written out
            q_pos = torch.arange(past_len, past_len + T, device=q.device)[:, None]
            k_pos = torch.arange(key_start, past_len + T, device=q.device)[None, :]
            if mask is None:
                mask = sdpa_mask(
                    batch_size=1,
                    q_length=T,
                    kv_length=kv_len,
                    q_offset=past_len,
                    kv_offset=key_start,
                    mask_function=attention_mask_function(causal=self.causal),
                    allow_is_causal_skip=False,
                    device=q.device,
                )
        if mask is not None and additive is None:
            raise ValueError(
                f"attn_implementation={impl!r} takes no dense attention mask, and this input needs one (padding, "
                "packed documents, ALiBi or a sliding window); use 'sdpa' or 'eager'"
            )
        if self.alibi:
            dist = (q_pos - k_pos).abs() if not self.causal else (q_pos - k_pos)
            bias = -alibi_slopes(self.num_heads).to(q.device)[:, None, None] * dist.to(torch.float32)  # (H, T, kv)
            mask = bias[None].to(q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
        elif additive and mask is not None:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask, torch.finfo(q.dtype).min
            )

        with decode_kernels(q, past_len), kernel_dtype:
            out, _ = attention_function(impl)(
                self,
                q,
                k,
                v,
                mask,
                dropout=self.dropout if self.training else 0.0,
                scaling=self.head_dim**-0.5,
                is_causal=mask is None and self.causal and T > 1 and past_len == 0,
            )  # (B, T, H, D)
        out = out.reshape(B, T, self.num_heads * self.head_dim).to(out_dtype)
        return self.o_proj(out)
