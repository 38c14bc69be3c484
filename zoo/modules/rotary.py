"""Rotary position embeddings (Su et al., 2021, "RoFormer", arXiv:2104.09864) on transformers' RoPE utilities.

The frequencies come from ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``, so every scaling type that
transformers knows (``linear`` position interpolation, ``dynamic`` NTK, ``yarn``, ``longrope``, ``llama3``) works
from ``config.rope_parameters`` exactly as it does for Llama. ``zoo.positional`` builds on this module.
"""

from __future__ import annotations

import copy

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def default_inv_freq(config, device=None, **_) -> tuple[torch.Tensor, float]:
    """Unscaled RoPE: ``theta ** (-2i / dim)`` for ``i < dim / 2``."""
    base = config.rope_parameters["rope_theta"]
    dim = int(config.head_dim * getattr(config, "partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)
    )
    return inv_freq, 1.0


def rope_init_fn(rope_type: str):
    if rope_type == "default":
        return default_inv_freq
    if rope_type not in ROPE_INIT_FUNCTIONS:
        known = ("default", *ROPE_INIT_FUNCTIONS)
        raise ValueError(f"rope_parameters['rope_type']={rope_type!r} is not one of {known}")
    return ROPE_INIT_FUNCTIONS[rope_type]


class RotaryEmbedding(LlamaRotaryEmbedding):
    """transformers' Llama rotary embedding: ``(cos, sin)`` of shape ``(B, T, dim)`` for the given position ids.

    Kept as a subclass only for what Llama's does not do: a rotated width other than the config's (``head_dim``,
    for models whose key width differs), partial rotary in the unscaled type, the original window read from
    ``rope_parameters`` (longrope and dynamic NTK measure growth against it), and an error naming an unknown
    ``rope_type``. ``config`` must carry ``rope_parameters`` and ``max_position_embeddings``.
    """

    compute_default_rope_parameters = staticmethod(default_inv_freq)

    def __init__(self, config, head_dim: int | None = None):
        config = copy.copy(config)
        config.head_dim = (
            head_dim
            or getattr(config, "head_dim", None)
            or (config.hidden_size // config.num_attention_heads)
        )
        rope_init_fn(config.rope_parameters.get("rope_type", "default"))  # names an unknown type
        super().__init__(config)
        self.original_max_seq_len = config.rope_parameters.get(
            "original_max_position_embeddings", config.max_position_embeddings
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, T, H, D)`` by ``cos``/``sin`` of shape ``(B, T, d)``, ``d <= D``.

    Only the first ``d`` channels rotate (partial rotary); the rest pass through.
    """
    d = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(x0, x1) -> (-x1, x0)`` (the interleaved convention of torchscale/GPT-J)."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotate_pairs(x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of a float32/64 ``x`` (..., D) by complex numbers ``phase`` (..., D/2),
    broadcast: each pair is one complex number, the rotation one complex product (one pass each way). A
    ``phase`` off the unit circle scales the pair as well (xPos)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * phase).flatten(-2)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, T, H, D)`` with adjacent pairs; ``cos``/``sin`` ``(B, T, D)`` repeat each angle twice.

    In float32/float64 each pair is one complex number and the rotation one complex product (a single pass
    forward and backward); other dtypes, and torch.compile (inductor generates no code for complex numbers,
    and fuses the real form with its neighbours), use the real form ``x cos + rotate_every_two(x) sin``.
    """
    if (
        x.dtype in (torch.float32, torch.float64)
        and x.shape[-1] % 2 == 0
        and not torch.compiler.is_compiling()
    ):
        phase = torch.complex(cos[..., ::2].to(x.dtype), sin[..., ::2].to(x.dtype))  # (B, T, D/2)
        return rotate_pairs(x, phase.unsqueeze(2))
    return x * cos.unsqueeze(2) + rotate_every_two(x) * sin.unsqueeze(2)
