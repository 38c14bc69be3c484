"""RWKV-4 against transformers' ``RwkvForCausalLM`` holding the same weights (``convert_rwkv``); RWKV-6 and -7,
which transformers does not have, against the baseline transformer of the same width and depth. Peng et al. 2023,
arXiv:2305.13048; 2024, arXiv:2404.05892; 2025, arXiv:2503.14456."""

from bench.registry import BASELINE, Entry, Reference


def _to_transformers(model):
    from zoo.models.rwkv.convert_rwkv import to_transformers

    return to_transformers(model)


ENTRIES = [
    Entry(
        name="rwkv4",
        model_type="zoo_rwkv",
        family="wkv4",
        config={"version": 4},
        reference=Reference("transformers RwkvForCausalLM (same weights)", _to_transformers, True, max_length=2048),
        mixers=("RwkvTimeMix",),
    ),
    Entry(name="rwkv6", model_type="zoo_rwkv", family="rwkv6", config={"version": 6}, reference=BASELINE,
          mixers=("RwkvTimeMix",)),
    Entry(name="rwkv7", model_type="zoo_rwkv", family="rwkv7", config={"version": 7}, reference=BASELINE,
          mixers=("RwkvTimeMix",)),
]  # fmt: skip
