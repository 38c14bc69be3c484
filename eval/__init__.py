"""The long-context evaluation suite of zoo: tasks, runner, scoring and reports.

    python -m eval --model PATH --suite quick|standard|full --lengths 1k,2k,4k --out DIR

- ``eval/tasks/``: offline, seeded generators (passkey, RULER needles and aggregation, MQAR, selective copying,
  BABILong-style bAbI, ListOps, perplexity), each hitting a requested length in the model's tokens;
- ``eval/predictors.py``: the predictor interface (``generate``, ``loglikelihood``) and its transformers form;
- ``eval/scoring.py``: exact match / accuracy / perplexity of a cell;
- ``eval/runner.py``: suites, resumable results.json;
- ``eval/report.py``: markdown tables, heatmaps and curves, the model-index block.
"""

from eval.predictors import HFPredictor, Predictor, load_model
from eval.runner import SUITES, Suite, run_suite
from eval.tasks import TASKS, Sample, Task, get_task

__all__ = [
    "SUITES",
    "TASKS",
    "HFPredictor",
    "Predictor",
    "Sample",
    "Suite",
    "Task",
    "get_task",
    "load_model",
    "run_suite",
]
