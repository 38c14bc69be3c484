"""Model cards for zoo models, from the per-architecture templates in ``model_cards/``.

A card is a ``huggingface_hub.ModelCard``: YAML metadata (library, tags, ``model-index`` with evaluation results)
and a markdown body filled from ``model_cards/<arch>.md`` (``zoo_retnet`` uses ``retnet.md``), falling back to
``default.md``. The training loop writes one into every final model folder; ``add_eval_results`` later merges the
``model_index.yaml`` written by ``python -m eval`` into it.

A template's ``{load}`` field is the "how to load" text, written by :func:`load_section` between two HTML comments
(invisible on the Hub): in a saved model's card it loads with zoo installed; ``python -m zoo.hub export`` replaces
it with the ``trust_remote_code=True`` version, in the words of the architecture (the Auto classes that load it, an
encoder's masked-LM head, RMT's backbone).
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
_FALLBACK = """# {name}\n\nA `{model_type}` model ({num_parameters} parameters) built with zoo.\n\n## Use\n\n{load}
\n## Training\n\n{training}\n\n## Results\n\n{results}\n\n## Architecture\n\n{architecture}\n"""
LOAD_BEGIN, LOAD_END = "<!-- zoo:load -->", "<!-- /zoo:load -->"
# The Hub's pipeline of a model saved as each Auto class's model (text generation otherwise)
PIPELINE_TAGS = {
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
}
# What each Auto class of an export gives, in the card's words
AUTO_PURPOSE = {
    "AutoModelForCausalLM": "language modelling and `generate()`",
    "AutoModelForMaskedLM": "the encoder with its masked-LM head",
    "AutoModel": "the backbone's hidden states, no head",
    "AutoModelForSequenceClassification": "sequence classification, under a new head to fine-tune",
    "AutoModelForQuestionAnswering": "extractive question answering, under a new head to fine-tune",
    "AutoModelForTokenClassification": "token classification, under a new head to fine-tune",
}


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
        load=load_section(config, repo_id or name, remote_code=False),
    )
    body = fill_template(template_for(config.model_type), fields)
    data = card_data(
        config.model_type,
        datasets=datasets,
        license=license,
        base_model=base_model,
        pipeline_tag=PIPELINE_TAGS.get(saved_auto_class(config), "text-generation"),
    )
    if model_index:
        data.model_name, data.eval_results = model_index_to_eval_results(model_index)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def card_data(model_type: str, **fields) -> ModelCardData:
    """The metadata of a zoo model's card (the ``ModelCardData`` fields the Hub indexes)."""
    fields = {"pipeline_tag": "text-generation", **{k: v for k, v in fields.items() if v is not None}}
    return ModelCardData(library_name="transformers", tags=["zoo", model_type, "long-context"], **fields)


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


def saved_auto_class(config) -> str:
    """The Auto class that loads the weights as saved (``config.architectures``); the causal LM by default."""
    from zoo.hub.export import auto_classes

    saved = (getattr(config, "architectures", None) or [None])[0]
    found = [auto for auto, cls in auto_classes(config.model_type).items() if cls.__name__ == saved]
    return found[0] if found else "AutoModelForCausalLM"


def _load_code(auto: str, repo_id: str, remote_code: bool) -> list[str]:
    trust = ", trust_remote_code=True" if remote_code else ""
    lines = ["```python"]
    if not remote_code:
        lines.append("import zoo  # registers zoo's architectures with the Auto classes")
    lines += [
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("{repo_id}"{trust})',
        # the folder's config names remote code: AutoTokenizer reads it too, and would ask before running it
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{trust})',
    ]
    if auto == "AutoModelForMaskedLM":
        lines += [
            'ids = tokenizer(f"The capital of France is {tokenizer.mask_token}.", return_tensors="pt").input_ids',
            "predicted = model(input_ids=ids).logits.argmax(-1)  # the most likely token at every position",
        ]
    elif auto == "AutoModelForCausalLM":
        lines += [
            'ids = tokenizer("The ", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))",
        ]
    else:
        lines += [
            'ids = tokenizer("A long document.", return_tensors="pt").input_ids',
            "logits = model(input_ids=ids).logits",
        ]
    return [*lines, "```"]


def load_section(config, repo_id: str, *, remote_code: bool, triton: bool = False) -> str:
    """How to load a model of ``config`` from ``repo_id``, between :data:`LOAD_BEGIN` and :data:`LOAD_END`:
    after ``import zoo`` (``remote_code=False``, a saved model), or with ``trust_remote_code=True`` where zoo is
    not installed (an export; ``triton``: its ops ship Triton kernels)."""
    import zoo
    from zoo.hub.export import auto_classes, requirements_text

    classes = auto_classes(config.model_type)
    auto = saved_auto_class(config)
    model_type = config.model_type
    paragraphs = ["\n".join(_load_code(auto, repo_id, remote_code))]
    if remote_code:
        pins = [line for line in requirements_text().splitlines() if line.startswith("transformers")]
        text = (
            "This folder carries its own modeling code, written by `python -m zoo.hub export`: it loads where zoo is "
            f"not installed, with torch and transformers only (`requirements.txt`: `{pins[0]}`). "
            f"`trust_remote_code=True` runs that code (`modeling_{model_type}.py` and the files it imports): read "
            "it before you trust it."
        )
        if triton:
            text += (
                " On a CUDA GPU with triton installed the ops run their Triton kernels (in this folder too); "
                "elsewhere, their PyTorch path."
            )
    else:
        text = (
            "Loading needs zoo installed: `import zoo` registers its architectures with transformers' Auto classes. "
            "`python -m zoo.hub export` writes a copy of this folder with its modeling code, which loads without zoo "
            "(`trust_remote_code=True`)."
        )
    paragraphs.append(text)
    paragraphs.append(
        "The Auto classes that load it: "
        + "; ".join(f"`{name}` ({AUTO_PURPOSE[name]})" for name in classes if name in AUTO_PURPOSE)
        + "."
    )
    saved = classes[auto].__name__
    if "AutoModelForMaskedLM" in classes and auto == "AutoModelForMaskedLM":
        paragraphs.append(
            f"These weights are the encoder with its masked-LM head (`{saved}`), as a masked-LM recipe trains it or "
            "a converter writes it: `AutoModelForMaskedLM` loads them as they are, the task classes put a new head "
            "on the same encoder; `AutoModelForCausalLM` builds the architecture's causal variant, which predicts "
            "the next token only once trained as one."
        )
    elif "AutoModelForMaskedLM" in classes:
        paragraphs.append(
            f"These weights are the architecture's causal variant (`{saved}`), a decoder for `generate()` and "
            "lm-evaluation-harness; `AutoModelForMaskedLM` and the task classes are for checkpoints trained or "
            "converted as encoders."
        )
    backbone = getattr(config, "backbone", None)
    backbone_type = getattr(backbone, "model_type", None)
    if backbone_type is not None:
        if not remote_code:
            text = f"The memory wrapper's backbone (`{backbone_type}`) is nested in `config.json`; the weights hold both."
        elif backbone_type in zoo.REGISTRY:
            text = (
                f"The memory wrapper reads the input segment by segment through its backbone, a zoo `{backbone_type}` "
                f"whose code is in this folder too: loading registers `{backbone_type}` with `AutoConfig` and "
                "`AutoModelForCausalLM` in the loading process (unless something already has), so that the backbone's "
                "config nested in `config.json` and its weights load with the wrapper."
            )
        else:
            text = (
                f"The memory wrapper reads the input segment by segment through its backbone, transformers' own "
                f"`{backbone_type}`, built from the config nested in `config.json`: only the wrapper's code is in "
                "this folder."
            )
        paragraphs.append(text)
    if auto == "AutoModelForCausalLM":
        if remote_code:
            paragraphs.append(
                "Evaluate it with lm-evaluation-harness (0.4): `lm_eval --model hf --model_args "
                f"pretrained={repo_id},trust_remote_code=True,add_bos_token=False --tasks hellaswag,arc_easy` "
                "(`add_bos_token=False` for zoo's byte-level tokenizer, which would otherwise end every context with "
                "its end-of-sequence token)."
            )
        else:
            paragraphs.append(
                "lm-evaluation-harness runs the exported folder (`--model hf`, `trust_remote_code=True` in "
                "`--model_args`)."
            )
    return "\n\n".join([LOAD_BEGIN, *paragraphs, LOAD_END])


def export_card(model_dir: str | Path, config, out_dir: str | Path) -> Path:
    """``out_dir/README.md``: the card of ``model_dir`` (rendered anew when it has none), its "how to load" text
    replaced by the ``trust_remote_code=True`` one (added under "Use without zoo" to a card without it)."""
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
    repo_id = _repo_id_in(text) or out_dir.name
    triton = any(out_dir.glob("*_triton.py"))
    section = load_section(config, repo_id, remote_code=True, triton=triton)
    marked = re.compile(re.escape(LOAD_BEGIN) + ".*?" + re.escape(LOAD_END), re.DOTALL)
    if marked.search(text):
        text = marked.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip() + "\n\n## Use without zoo\n\n" + section + "\n"
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
    match = re.search(r'from_pretrained\("([^"]+)"[,)]', text)
    return match[1] if match else None
