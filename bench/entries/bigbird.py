"""BigBird: the bidirectional block-sparse encoder (masked-LM step, no decoding) against transformers'
``BigBirdForMaskedLM`` holding the same weights (``convert_bigbird``; transformers' eval-mode random plan), and the
causal variant against the baseline transformer. Zaheer et al. 2020, arXiv:2007.14062."""

from bench.registry import BASELINE, Entry, Reference, sized


def _encoder(hidden_size, layers, max_len):
    from zoo.models.bigbird import ZooBigBirdForMaskedLM

    config = sized("zoo_bigbird", hidden_size, layers, max_len, causal=False, transformers_compat=True)
    return ZooBigBirdForMaskedLM(config)


def _to_transformers(model):
    from zoo.models.bigbird.convert_bigbird import to_transformers

    return to_transformers(model)


ENTRIES = [
    Entry(
        name="bigbird_mlm",
        model_type="zoo_bigbird",
        family="block_sparse",
        build=_encoder,
        reference=Reference("transformers BigBirdForMaskedLM (same weights)", _to_transformers, True),
        workloads=("train", "prefill", "memory"),
        objective="masked_lm",
        mixers=("BigBirdSelfAttention",),
        lengths=(1024, 4096),
    ),
    Entry(
        name="bigbird",
        model_type="zoo_bigbird",
        family="block_sparse",
        config={"causal": True},
        reference=BASELINE,
        mixers=("BigBirdSelfAttention",),
        lengths=(1024, 4096),
    ),
]
