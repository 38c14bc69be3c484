"""Local data of the offline lm-evaluation-harness tasks in this folder (read from the JSON Lines files beside it,
so that the tasks run without network): ``lm_eval --include_path eval/lm_eval_tasks --tasks zoo_tiny``."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _docs(name: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / f"{name}.jsonl"))})


def choice_docs(**metadata) -> datasets.DatasetDict:
    """Questions with three continuations, one right: scored by loglikelihood (``multiple_choice``)."""
    return _docs("zoo_tiny_choice")


def copy_docs(**metadata) -> datasets.DatasetDict:
    """Prompts asking to repeat a word: scored by greedy generation (``generate_until``)."""
    return _docs("zoo_tiny_copy")
