"""The tasks of the long-context suite, by name. Each module's docstring cites the paper it follows."""

from __future__ import annotations

from eval.tasks.babilong import BabiQA
from eval.tasks.base import METRICS, CellSkipped, Sample, Task, count_tokens, format_depth
from eval.tasks.listops import ListOps
from eval.tasks.passkey import Passkey
from eval.tasks.perplexity import Perplexity
from eval.tasks.recall import MultiQueryAssociativeRecall, SelectiveCopying
from eval.tasks.ruler import (
    HAYSTACKS,
    NIAH_KINDS,
    CommonWordsExtraction,
    FrequentWordsExtraction,
    NeedleInAHaystack,
    VariableTracking,
)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Passkey(),
        *(NeedleInAHaystack(kind, haystack) for kind in NIAH_KINDS for haystack in HAYSTACKS),
        VariableTracking(),
        CommonWordsExtraction(),
        FrequentWordsExtraction(),
        MultiQueryAssociativeRecall(),
        SelectiveCopying(),
        *(BabiQA(k) for k in (1, 2, 3)),
        ListOps(),
        Perplexity(),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["METRICS", "TASKS", "CellSkipped", "Sample", "Task", "count_tokens", "format_depth", "get_task"]
