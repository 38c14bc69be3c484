"""Mamba-1 and Mamba-2 against transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` holding the same weights
(zoo's converters). Gu and Dao 2023, arXiv:2312.00752; Dao and Gu 2024, arXiv:2405.21060.

transformers' CPU paths without mamba_ssm are slow reference loops (Mamba-1 steps through time in Python), so
they are timed up to 2048 tokens only (``Reference.max_length``); zoo is timed at every length.
"""

from bench.registry import Entry, Reference


def _mamba_to_transformers(model):
    from zoo.models.mamba.convert_mamba import to_transformers

    return to_transformers(model)


def set_chunk_size(reference, chunk: int):
    """transformers' Mamba-2 (Bamba) mixers, and its config, at chunk length ``chunk``."""
    for module in reference.modules():
        if type(module).__name__.endswith("Mixer") and hasattr(module, "chunk_size"):
            module.chunk_size = chunk
    config = reference.config
    setattr(config, "mamba_chunk_size" if hasattr(config, "mamba_chunk_size") else "chunk_size", chunk)
    return reference


def same_chunk_size(reference, model):
    """Give transformers' Mamba-2 mixers the chunk length zoo's scan uses on this device, so that the ratio measures
    the implementations on the same chunking (transformers' default, 256, runs its CPU path several times slower;
    zoo's config leaves the chunk to the op, ``Mamba2Mixer.scan_chunk_size``)."""
    device = next(model.parameters()).device
    chunks = {m.scan_chunk_size(device) for m in model.modules() if type(m).__name__ == "Mamba2Mixer"}
    if len(chunks) != 1:
        raise ValueError(f"expected one chunk length across the Mamba-2 mixers, got {sorted(chunks)}")
    return set_chunk_size(reference, chunks.pop())


def _mamba2_to_transformers(model):
    from zoo.models.mamba2.convert_mamba2 import to_transformers

    return same_chunk_size(to_transformers(model), model)


ENTRIES = [
    Entry(
        name="mamba",
        model_type="zoo_mamba",
        family="selective_scan",
        reference=Reference(
            "transformers MambaForCausalLM (same weights)", _mamba_to_transformers, True, max_length=2048
        ),
        mixers=("MambaMixer",),
        lengths=(2048, 4096, 8192, 16384),
    ),
    Entry(
        name="mamba2",
        model_type="zoo_mamba2",
        family="ssd",
        reference=Reference(
            "transformers Mamba2ForCausalLM (same weights)", _mamba2_to_transformers, True, max_length=2048
        ),
        mixers=("Mamba2Mixer",),
        lengths=(2048, 4096, 8192, 16384),
    ),
]
