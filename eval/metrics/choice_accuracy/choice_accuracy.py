"""Accuracy of multiple-choice answers: the fraction of predictions equal to their reference string."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predicted choices that equal the reference answer (exact string equality)."
_INPUTS = """
Args:
    predictions: the chosen answers (strings).
    references: the correct answers (strings).
Returns:
    accuracy: float in [0, 1].
"""


class ChoiceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        correct = sum(p == r for p, r in zip(predictions, references, strict=True))
        return {"accuracy": correct / max(len(references), 1)}
