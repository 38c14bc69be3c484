"""Longformer: the bidirectional encoder (masked-LM step, no decoding) against transformers'
``LongformerForMaskedLM`` holding the same weights (``convert_longformer``), and the causal sliding-window language
model against the baseline transformer. Beltagy et al. 2020, arXiv:2004.05150."""

import torch

from bench.registry import BASELINE, Entry, Reference, sized


def _encoder(hidden_size, layers, max_len):
    from zoo.models.longformer import ZooLongformerForMaskedLM

    return ZooLongformerForMaskedLM(sized("zoo_longformer", hidden_size, layers, max_len + 2, causal=False))


def _to_transformers(model):
    from zoo.models.longformer.convert_longformer import to_transformers

    return to_transformers(model)


def _no_global_tokens(ids):
    """Local attention only, in both models (zoo's encoder would otherwise make the first token global)."""
    return {"global_attention_mask": torch.zeros_like(ids)}


ENTRIES = [
    Entry(
        name="longformer_mlm",
        model_type="zoo_longformer",
        family="sliding_window",
        build=_encoder,
        reference=Reference("transformers LongformerForMaskedLM (same weights)", _to_transformers, True),
        workloads=("train", "prefill", "memory"),
        objective="masked_lm",
        forward_kwargs=_no_global_tokens,
        mixers=("LongformerSelfAttention",),
        lengths=(1024, 4096, 16384),
    ),
    Entry(
        name="longformer",
        model_type="zoo_longformer",
        family="sliding_window",
        config={"causal": True},
        reference=BASELINE,
        mixers=("LongformerSelfAttention",),
        lengths=(1024, 4096, 16384),
    ),
]
