"""RetNet (chunked retention) against the baseline transformer of the same width and depth. Sun et al. 2023,
arXiv:2307.08621. ``python -m bench retnet`` is the detailed pair harness (:mod:`bench.harness`)."""

from bench.registry import BASELINE, Entry

ENTRIES = [
    Entry(
        name="retnet",
        model_type="zoo_retnet",
        family="retention",
        config={"retention_mode": "chunk"},
        reference=BASELINE,
        mixers=("MultiScaleRetention",),
        notes="the parameter-matched pair, packed documents and the 3x target: python -m bench retnet",
    )
]
