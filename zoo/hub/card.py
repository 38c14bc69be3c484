"""Model cards for zoo models, from the per-architecture templates in ``model_cards/``.

A card is a ``huggingface_hub.ModelCard``: YAML metadata (library, tags, ``model-index`` with evaluation results)
and a markdown body filled from ``model_cards/<arch>.md`` (``zoo_retnet`` uses ``retnet.md``), falling back to
``default.md``. The training loop writes one into every final model folder; ``add_eval_results`` later merges the
``model_index.yaml`` written by ``python -m eval`` into it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

TEMPLATES = Path(__file__).resolve().parents[2] / "model_cards"
_FALLBACK = """# {name}\n\nA `{model_type}` model ({num_parameters} parameters) built with zoo.\n\n## Training\n\n{training}
\n## Results\n\n{results}\n\n## Architecture\n\n{architecture}\n"""


def fill_template(template: str, fields: dict) -> str:
    """``template`` with each ``{field}`` of ``fields`` replaced; any other brace (JSON, LaTeX, code in a card) is
    left as written."""
    return re.sub(r"\{(\w+)\}", lambda m: str(fields[m[1]]) if m[1] in fields else m[0], template)


def template_for(model_type: str) -> str:
    name = model_type.removeprefix("zoo_")
    for candidate in (TEMPLATES / f"{name}.md", TEMPLATES / "default.md"):
        if candidate.is_file():
            return candidate.read_text()
    return _FALLBACK


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_model_card(
    config,
    *,
    name: str,
    repo_id: str | None = None,
    num_parameters: int | None = None,
    training: str = "",
    metrics: dict | None = None,
    model_index: list | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """A card for a model with ``config``; ``metrics`` become a results table, ``model_index`` the metadata."""
    metrics = metrics or {}
    results = "\n".join(
        ["| metric | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]]
    )
    skip = {"architectures", "transformers_version", "dtype", "id2label", "label2id"}
    arch = {k: v for k, v in config.to_diff_dict().items() if k not in skip}
    fields = dict(
        name=name,
        repo_id=repo_id or name,
        model_type=config.model_type,
        num_parameters=f"{num_parameters / 1e6:.2f}M" if num_parameters else "-",
        training=training or "-",
        results=results if metrics else "No results recorded.",
        architecture="```json\n" + json.dumps(arch, indent=2, sort_keys=True, default=str) + "\n```",
    )
    body = fill_template(template_for(config.model_type), fields)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["zoo", config.model_type, "long-context"],
        datasets=datasets,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    if model_index:
        card.data.model_index = model_index
        card = ModelCard(f"---\n{_metadata_yaml(card)}---\n\n{body}")
    return card


def _metadata_yaml(card: ModelCard) -> str:
    meta = card.data.to_dict()
    if "model_index" in meta:
        meta["model-index"] = meta.pop("model_index")
    return yaml.safe_dump(meta, sort_keys=False)


def write_model_card(folder: str | Path, recipe, metrics: dict) -> Path:
    """Write ``folder/README.md`` for a trained model folder (``config.json`` inside) and its ``recipe``."""
    from transformers import AutoConfig

    import zoo  # noqa: F401  registers zoo's configurations

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    repo_id = getattr(getattr(recipe, "hub", None), "repo_id", None)
    steps = metrics.get("steps", "?")
    train_data = getattr(getattr(recipe, "data", None), "train", "?")
    training = (
        f"Trained with `accelerate launch train.py` for {steps} steps on `{train_data}`; the full recipe is in "
        "`recipe.yaml` beside the weights."
    )
    card = render_model_card(
        config,
        name=repo_id or folder.name,
        repo_id=repo_id,
        num_parameters=metrics.get("num_parameters"),
        training=training,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    )
    path = folder / "README.md"
    card.save(path)
    return path


def add_eval_results(folder: str | Path, results_dir: str | Path) -> Path:
    """Merge ``results_dir/model_index.yaml`` (from ``python -m eval``) into ``folder/README.md``'s metadata."""
    folder, results_dir = Path(folder), Path(results_dir)
    index_path = results_dir / "model_index.yaml"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} does not exist; run `python -m eval --out {results_dir}` first"
        )
    index = yaml.safe_load(index_path.read_text())
    index = index.get("model-index", index) if isinstance(index, dict) else index
    card_path = folder / "README.md"
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} does not exist; write the card first (write_model_card)")
    card = ModelCard.load(card_path)
    card.data.model_index = index
    report = results_dir / "report.md"
    text = card.text
    if report.is_file() and "## Long-context evaluation" not in text:
        text += "\n## Long-context evaluation\n\n" + report.read_text()
    ModelCard(f"---\n{_metadata_yaml(card)}---\n{text}").save(card_path)
    return card_path
