"""Hyena against the baseline transformer of the same width and depth; decoding with the long filters distilled
into diagonal recurrences (``HyenaForCausalLM.distill_recurrence``, state 16), O(1) per token. Poli et al. 2023,
arXiv:2302.10866; Massaroli et al. 2023, arXiv:2310.18780. ``python -m bench.hyena`` is the earlier script."""

from bench.registry import BASELINE, Entry

DISTILL_STATE = 16
# Taps fitted. ``fit_modes`` forms its Hankel matrices a few channels at a time and finds their leading vectors
# by a randomized range finder: at hidden 256, 4 layers (one core) 1024 taps take ~20 s and 1 GB, 4096 taps
# ~160 s and 1.5 GB, with the same fit error (2.5e-7); decoding costs the same either way.
DISTILL_MAX_LENGTH = 1024


def _distill(model, longest_context):
    errors = model.distill_recurrence(
        DISTILL_STATE, length=min(max(longest_context, 2 * DISTILL_STATE + 2), DISTILL_MAX_LENGTH)
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
