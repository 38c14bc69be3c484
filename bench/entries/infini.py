"""Infini-attention against the baseline transformer of the same width and depth: attention inside segments plus
a compressive memory, so memory and time per token stay bounded by the segment length. Munkhdalai et al. 2024,
arXiv:2404.07143. ``python -m bench.infini`` is the earlier script (peak memory flat in T)."""

from bench.registry import BASELINE, Entry, causal_lm


def _build(hidden_size, layers, max_len):
    segment = 2048 if max_len >= 4096 else 64  # --quick lengths still cross segments
    return causal_lm(
        "zoo_infini", hidden_size, layers, max_len, segment_length=segment, memory_update="delta"
    )


ENTRIES = [
    Entry(
        name="infini",
        model_type="zoo_infini",
        family="infini",
        build=_build,
        reference=BASELINE,
        mixers=("InfiniAttention",),
        lengths=(4096, 16384),
    )
]
