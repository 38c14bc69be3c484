"""Hyena against the baseline transformer of the same width and depth; decoding with the long filters distilled
into diagonal recurrences (``HyenaForCausalLM.distill_recurrence``, state 16), O(1) per token. Poli et al. 2023,
arXiv:2302.10866; Massaroli et al. 2023, arXiv:2310.18780. ``python -m bench.hyena`` is the earlier script."""

from bench.registry import BASELINE, Entry

DISTILL_STATE = 16
# Taps fitted: the fit takes the SVD of a (d, M/2, M/2) float64 Hankel matrix per layer, 0.5 GiB at M = 1024 (the
# process's peak +2.2 GB, ~2.5 min on one core) but 8 GiB at 4096, plus its singular vectors (> 22 GB in all).
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
