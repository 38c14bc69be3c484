"""Position interpolation and extrapolation: RoPE scaling, learned-table interpolation, randomized positions,
chunked state-passing inference. ALiBi and NoPE are position options of the attention module
(``position_embedding_type``); xPos belongs to retention (``zoo.models.retnet``)."""

from zoo.positional.chunked import chunked_forward
from zoo.positional.learned import interpolate_position_embeddings, interpolate_position_table
from zoo.positional.randomized import randomize_packed_positions, randomized_position_ids
from zoo.positional.rope_scaling import METHODS, extend_context, rope_parameters_for

__all__ = [
    "METHODS",
    "chunked_forward",
    "extend_context",
    "interpolate_position_embeddings",
    "interpolate_position_table",
    "randomize_packed_positions",
    "randomized_position_ids",
    "rope_parameters_for",
]
