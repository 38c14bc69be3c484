"""The Recurrent Memory Transformer over the zoo baseline against the baseline itself: segments of 128 tokens
with 16 memory tokens (``config`` overrides them). Bulatov et al. 2022, arXiv:2207.06881. ``python -m bench.rmt``
is the earlier script (stored activations against the number of segments, with and without truncated BPTT and
per-segment checkpointing)."""

from bench.registry import BASELINE, Entry

ENTRIES = [
    Entry(
        name="rmt",
        model_type="zoo_rmt",
        family="rmt",
        reference=BASELINE,
        mixers=("Attention",),
        lengths=(4096, 16384),
    )
]
