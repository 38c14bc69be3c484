"""Model cards for zoo models, from the per-architecture templates in ``model_cards/``.

A card is a ``huggingface_hub.ModelCard``: YAML metadata (library, tags, ``model-index`` with evaluation results)
and a markdown body filled from ``model_cards/<arch>.md`` (``zoo_retnet`` uses ``retnet.md``), falling back to
``default.md``. The training loop writes one into every final model folder; ``add_eval_results`` later merges the
``model_index.yaml`` written by ``python -m eval`` into it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

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
    license: str = "apache-2.0",
    base_model: str | None = None,
) -> ModelCard:
    """A card for a model with ``config``; ``metrics`` become a results table, ``model_index`` (the
    ``model-index`` of ``python -m eval``) the evaluation metadata; ``base_model``: the Hub id a fine-tuned model
    started from."""
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
    data = card_data(config.model_type, datasets=datasets, license=license, base_model=base_model)
    if model_index:
        data.model_name, data.eval_results = model_index_to_eval_results(model_index)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def card_data(model_type: str, **fields) -> ModelCardData:
    """The metadata of a zoo model's card (the ``ModelCardData`` fields the Hub indexes)."""
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["zoo", model_type, "long-context"],
        **{k: v for k, v in fields.items() if v is not None},
    )


def hub_id(spec) -> str | None:
    """``spec`` (a recipe's data or model source) as a Hub id, or None for a local path or a built-in source."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(spec, str) or ":" in spec.removeprefix("hf:") or "/" not in spec:
        return None
    spec = spec.removeprefix("hf:")
    if Path(spec).exists():
        return None
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return None
    return spec


def write_model_card(folder: str | Path, recipe, metrics: dict) -> Path:
    """Write ``folder/README.md`` for a trained model folder (``config.json`` inside) and its ``recipe``."""
    from transformers import AutoConfig

    import zoo  # noqa: F401  registers zoo's configurations

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    repo_id = getattr(getattr(recipe, "hub", None), "repo_id", None)
    steps = metrics.get("steps", "?")
    train_data = getattr(getattr(recipe, "data", None), "train", "?")
    model_spec = getattr(recipe, "model", None)
    pretrained = model_spec.get("pretrained") if isinstance(model_spec, dict) else None
    training = (
        f"Trained with `accelerate launch train.py` for {steps} steps on `{train_data}`; the full recipe is in "
        "`recipe.yaml` beside the weights."
    )
    dataset = hub_id(train_data)
    card = render_model_card(
        config,
        name=repo_id or folder.name,
        repo_id=repo_id,
        num_parameters=metrics.get("num_parameters"),
        training=training,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        datasets=[dataset] if dataset else None,
        base_model=hub_id(pretrained),
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
    card.data.model_name, card.data.eval_results = model_index_to_eval_results(index)
    report = results_dir / "report.md"
    text = card.text
    if report.is_file() and "## Long-context evaluation" not in text:
        text += "\n## Long-context evaluation\n\n" + report.read_text()
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}").save(card_path)
    return card_path


LOAD_WITHOUT_ZOO = """## Use without zoo

This folder carries its own modeling code (exported by `python -m zoo.hub export`), so it loads where zoo is not
installed, with torch and transformers only:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

Evaluate it with lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={repo_id},trust_remote_code=True
--tasks hellaswag,arc_easy`.
"""


def export_card(model_dir: str | Path, config, out_dir: str | Path) -> Path:
    """``out_dir/README.md``: the card of ``model_dir`` (rendered anew when it has none), with how to load the
    export without zoo."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    source = model_dir / "README.md"
    if source.is_file():
        card = ModelCard.load(source)
        data, text = card.data, card.text
    else:
        card = render_model_card(config, name=model_dir.name, num_parameters=_count_parameters(model_dir))
        data, text = card.data, card.text
    if "custom_code" not in (data.tags or []):
        data.tags = [*(data.tags or []), "custom_code"]
    if "## Use without zoo" not in text:
        repo_id = _repo_id_in(text) or out_dir.name
        text = text.rstrip() + "\n\n" + LOAD_WITHOUT_ZOO.replace("{repo_id}", repo_id)
    path = out_dir / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.lstrip()}").save(path)
    return path


def _count_parameters(model_dir: Path) -> int:
    """Parameters stored in ``model_dir``'s safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _repo_id_in(text: str) -> str | None:
    match = re.search(r'from_pretrained\("([^"]+)"\)', text)
    return match[1] if match else None
