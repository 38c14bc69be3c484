"""Mamba-1 and Mamba-2 against transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` holding the same weights
(zoo's converters). Gu and Dao 2023, arXiv:2312.00752; Dao and Gu 2024, arXiv:2405.21060.

transformers' CPU paths without mamba_ssm are slow reference loops (Mamba-1 steps through time in Python), so
they are timed up to 2048 tokens only (``Reference.max_length``); zoo is timed at every length.
"""

from bench.registry import Entry, Reference


def _mamba_to_transformers(model):
    from zoo.models.mamba.convert_mamba import to_transformers

    return to_transformers(model)


def _mamba2_to_transformers(model):
    from zoo.models.mamba2.convert_mamba2 import to_transformers

    return to_transformers(model)


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
