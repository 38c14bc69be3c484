"""Hyena against the baseline transformer of the same width and depth; decoding with the long filters distilled
into diagonal recurrences (``HyenaForCausalLM.distill_recurrence``, state 16), O(1) per token. Poli et al. 2023,
arXiv:2302.10866; Massaroli et al. 2023, arXiv:2310.18780. ``python -m bench.hyena`` is the earlier script."""

from bench.registry import BASELINE, Entry

DISTILL_STATE = 16


def _distill(model, longest_context):
    errors = model.distill_recurrence(
        DISTILL_STATE, length=min(max(longest_context, 2 * DISTILL_STATE + 2), 4096)
    )
    return {"distilled_state": DISTILL_STATE, "distill_relative_errors": [float(e) for e in errors]}


ENTRIES = [
    Entry(
        name="hyena",
        model_type="zoo_hyena",
        family="long_conv",
        reference=BASELINE,
        prepare_decode=_distill,
        mixers=("HyenaOperator",),
        lengths=(1024, 4096, 16384),
    )
]
