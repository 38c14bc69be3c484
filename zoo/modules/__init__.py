"""Building blocks shared by every zoo model: norms, MLPs, rotary positions, attention, caches."""

from zoo.modules.attention import Attention, alibi_slopes, build_attention_mask
from zoo.modules.cache import RecurrentCache
from zoo.modules.documents import PackedDocuments, document_ids, document_starts
from zoo.modules.mlp import MLP, GatedMLP, act_mul, build_mlp
from zoo.modules.norms import RMSNorm, build_norm, gated_rms_norm, rms_norm
from zoo.modules.rotary import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_interleaved,
    rotate_every_two,
    rotate_half,
    rotate_pairs,
)

__all__ = [
    "MLP",
    "PackedDocuments",
    "Attention",
    "GatedMLP",
    "RMSNorm",
    "RecurrentCache",
    "RotaryEmbedding",
    "alibi_slopes",
    "apply_rotary",
    "apply_rotary_interleaved",
    "build_attention_mask",
    "act_mul",
    "build_mlp",
    "build_norm",
    "document_ids",
    "document_starts",
    "gated_rms_norm",
    "rotate_every_two",
    "rms_norm",
    "rotate_half",
    "rotate_pairs",
]
