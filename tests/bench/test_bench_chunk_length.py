"""The Mamba-2 and Bamba references are timed on zoo's chunk length, not transformers' default."""

import torch
from transformers import AutoModelForCausalLM

import zoo  # noqa: F401
from bench.entries.hybrid import _to_bamba
from bench.entries.mamba import _mamba2_to_transformers
from zoo.models.registry import sized_config


def _chunks(reference):
    return {m.chunk_size for m in reference.modules() if type(m).__name__.endswith("Mixer")}


def test_references_use_zoo_chunk_length():
    torch.manual_seed(0)
    mamba2 = AutoModelForCausalLM.from_config(sized_config("zoo_mamba2", 32, 1))
    hybrid = AutoModelForCausalLM.from_config(
        sized_config(
            "zoo_hybrid", 32, 2,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5},
        )
    )  # fmt: skip
    for model, build in ((mamba2, _mamba2_to_transformers), (hybrid, _to_bamba)):
        mixer = next(m for m in model.modules() if type(m).__name__ == "Mamba2Mixer")
        chunk = mixer.scan_chunk_size(torch.device("cpu"))
        reference = build(model)
        assert _chunks(reference) == {chunk}
        ids = torch.randint(3, 200, (1, 3 * chunk + 5))  # several chunks and a remainder
        with torch.no_grad():
            got, expected = model(ids, use_cache=False).logits, reference(ids).logits
        assert ((got - expected).norm() / expected.norm()).item() < 1e-4
