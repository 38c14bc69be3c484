"""The baseline transformer (Llama-style, SDPA attention) against transformers' ``LlamaForCausalLM`` holding the
same weights (``zoo.models.transformer.convert_transformer.to_llama``). Vaswani et al. 2017, arXiv:1706.03762."""

from bench.registry import Entry, Reference


def _to_llama(model):
    from zoo.models.transformer.convert_transformer import to_llama

    return to_llama(model)


ENTRIES = [
    Entry(
        name="transformer",
        model_type="zoo_transformer",
        family="attention",
        reference=Reference("transformers LlamaForCausalLM (same weights)", _to_llama, same_weights=True),
        mixers=("Attention",),
    )
]
