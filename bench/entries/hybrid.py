"""The Mamba-2 / attention hybrid in Bamba's layout (an MLP after every layer, half of each attention head
rotated) against transformers' ``BambaForCausalLM`` holding the same weights (``convert_bamba``). Lieber et al.
2024 (Jamba), arXiv:2403.19887; IBM's Bamba."""

from bench.entries.mamba import same_chunk_size
from bench.registry import Entry, Reference


def _to_bamba(model):
    from zoo.models.hybrid.convert_bamba import to_transformers

    return same_chunk_size(to_transformers(model), model)


ENTRIES = [
    Entry(
        name="hybrid",
        model_type="zoo_hybrid",
        family="hybrid",
        config={
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}
        },
        reference=Reference("transformers BambaForCausalLM (same weights)", _to_bamba, True, max_length=4096),
        mixers=("Mamba2Mixer", "Attention"),
        lengths=(1024, 4096, 16384),
    )
]
