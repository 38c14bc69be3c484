"""Reformer (local and LSH attention layers, reversible residuals) as a causal language model, against the baseline
transformer of the same width and depth. Kitaev et al. 2020, arXiv:2001.04451. transformers'
``ReformerModelWithLMHead`` converts into zoo (``convert_reformer.from_transformers``) but not back yet, so the
same-weights comparison is left to a pair builder once that direction exists."""

from bench.registry import BASELINE, Entry

ENTRIES = [
    Entry(
        name="reformer",
        model_type="zoo_reformer",
        family="lsh_attention",
        config={"is_decoder": True},
        reference=BASELINE,
        mixers=("LSHSelfAttention", "LocalSelfAttention"),
        lengths=(1024, 4096, 16384),
    )
]
