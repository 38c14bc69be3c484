"""Reformer (local and LSH attention layers, reversible residuals) as a causal language model, against
transformers' ``ReformerModelWithLMHead`` holding the same weights (``convert_reformer.to_transformers``; the zoo
model hashes as transformers does, ``transformers_compat``) and against the baseline transformer of the same
width and depth. Kitaev et al. 2020, arXiv:2001.04451.

The issue's setting: d = 256, 4 layers alternating local and LSH attention, chunks of 64 (``python -m bench
--entries reformer_transformers --lengths 4096``). transformers' Reformer trains only on lengths that are a
multiple of its chunk lengths (64 here: every length the suite uses), and its axial positions only on the exact
length of their grid, so both models use a learned position table (``sized``: ``axial_pos_embds=False``).
"""

from bench.registry import BASELINE, Entry, Reference

# chunks of 64 for both attention kinds (the setting); the rest as ``sized`` builds it
CHUNK_64 = {"local_attn_chunk_length": 64, "lsh_attn_chunk_length": 64}


def _to_transformers(model):
    from zoo.models.reformer.convert_reformer import to_transformers

    return to_transformers(model)


ENTRIES = [
    Entry(
        name="reformer",
        model_type="zoo_reformer",
        family="lsh_attention",
        config={"is_decoder": True, **CHUNK_64},
        reference=BASELINE,
        mixers=("LSHSelfAttention", "LocalSelfAttention"),
        lengths=(1024, 4096, 16384),
    ),
    Entry(
        name="reformer_transformers",
        model_type="zoo_reformer",
        family="lsh_attention",
        config={"is_decoder": True, "transformers_compat": True, **CHUNK_64},
        # float32 rounding upstream of an LSH layer moves a few near-tie tokens to the next bucket, which changes
        # those rows by ~1e-3 (about 1 token in 100; 7e-5 over all logits at d = 256, T = 256); in float64 the
        # two agree to 1e-13
        reference=Reference(
            "transformers ReformerModelWithLMHead (same weights)", _to_transformers, True, tolerance=1e-3
        ),
        mixers=("LSHSelfAttention", "LocalSelfAttention"),
        lengths=(1024, 4096, 16384),
    ),
]
