"""Model cards: per-architecture templates, metadata, evaluation results merged as model-index."""

import re
import types

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from tests.models.tiny_configs import TINY, tiny_config
from zoo.hub import add_eval_results, render_model_card, write_model_card
from zoo.hub.__main__ import main as hub_main
from zoo.hub.card import fill_template, hub_id, load_section, template_for


@pytest.mark.parametrize(
    "model_type,phrase", [("zoo_transformer", "Llama-style"), ("zoo_retnet", "Retentive")]
)
def test_card_uses_the_architecture_template(model_type, phrase):
    card = render_model_card(
        tiny_config(model_type), name="tiny", num_parameters=1_234_000, metrics={"val_loss": 1.5}
    )
    assert phrase in card.text
    assert "1.23M" in card.text and "| val_loss | 1.5 |" in card.text
    assert model_type in card.data.tags and card.data.library_name == "transformers"
    assert "{" + "results}" not in card.text


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_architecture_card_renders_its_template_as_written(model_type):
    """Every registered architecture's card fills its template's fields and keeps every other brace of the
    template (JSON in examples, formulas) as written."""
    config = tiny_config(model_type)
    template = template_for(config.model_type)
    card = render_model_card(config, name="tiny", num_parameters=1_000_000, metrics={"val_loss": 1.5})
    assert "1.00M" in card.text and "| val_loss | 1.5 |" in card.text
    for field in ("{name}", "{results}", "{architecture}", "{num_parameters}"):
        assert field not in card.text
    filled = {
        "{name}",
        "{repo_id}",
        "{model_type}",
        "{num_parameters}",
        "{training}",
        "{results}",
        "{architecture}",
        "{load}",
    }
    kept = [b for b in re.findall(r"\{[^{}\n]*\}", template) if b not in filled]
    assert all(b in card.text for b in kept), [b for b in kept if b not in card.text]


def test_fill_template_leaves_other_braces():
    assert (
        fill_template('{name}: {"a": 1} e^{-1/2} {unknown}', {"name": "x"})
        == 'x: {"a": 1} e^{-1/2} {unknown}'
    )


def test_write_card_and_merge_eval_results(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("zoo_retnet"))
    model.save_pretrained(tmp_path / "model")
    recipe = types.SimpleNamespace(
        hub=types.SimpleNamespace(repo_id="me/tiny-retnet"), data=types.SimpleNamespace(train="default")
    )
    path = write_model_card(tmp_path / "model", recipe, {"steps": 10, "val_loss": 2.0})
    card = ModelCard.load(path)
    assert "me/tiny-retnet" in card.text and "10 steps" in card.text
    results = tmp_path / "eval"
    results.mkdir()
    index = [
        {
            "name": "tiny",
            "results": [
                {
                    "task": {"type": "text-generation", "name": "passkey"},
                    "dataset": {"type": "passkey", "name": "passkey"},
                    "metrics": [{"type": "accuracy", "value": 0.5}],
                }
            ],
        }
    ]
    (results / "model_index.yaml").write_text(yaml.safe_dump({"model-index": index}))
    (results / "report.md").write_text("| task | score |\n")
    assert hub_main(["add-eval", str(tmp_path / "model"), str(results)]) == 0
    merged = ModelCard.load(path)
    meta = yaml.safe_load(merged.content.split("---")[1])
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert merged.data.eval_results[0].metric_value == 0.5
    assert "## Long-context evaluation" in merged.text
    with pytest.raises(FileNotFoundError, match="model_index.yaml"):
        add_eval_results(tmp_path / "model", tmp_path / "missing")
    assert hub_main(["add-eval", str(tmp_path / "model"), str(tmp_path / "missing")]) == 2


INDEX = [
    {
        "name": "tiny",
        "results": [
            {
                "task": {"type": "text-generation", "name": "passkey"},
                "dataset": {"type": "passkey", "name": "passkey"},
                "metrics": [{"type": "accuracy", "value": 0.75}],
            }
        ],
    }
]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_architecture_card_parses_with_valid_metadata(tmp_path, model_type):
    """The saved card loads with ``ModelCard.load``; its metadata rebuilds a ``ModelCardData`` with the Hub's
    fields, and ``model-index`` carries the evaluation numbers."""
    card = render_model_card(
        tiny_config(model_type),
        name="tiny",
        metrics={"val_loss": 1.5},
        model_index=INDEX,
        datasets=["HuggingFaceFW/fineweb-edu"],
        base_model="me/base",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    meta = yaml.safe_load(loaded.content.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and model_type.split("@")[0] in meta["tags"]
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"] and meta["base_model"] == "me/base"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.75
    (result,) = loaded.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_name) == ("accuracy", 0.75, "passkey")
    assert loaded.data.model_name == "tiny"
    rebuilt = ModelCardData(**{k.replace("-", "_"): v for k, v in meta.items() if k != "model-index"})
    assert rebuilt.to_dict() == {k: v for k, v in meta.items() if k != "model-index"}


def test_hub_ids_for_base_model_and_datasets(tmp_path):
    assert hub_id("HuggingFaceFW/fineweb-edu") == "HuggingFaceFW/fineweb-edu"
    assert hub_id("hf:me/data") == "me/data"
    assert hub_id("default") is None and hub_id("synthetic:passkey") is None and hub_id(None) is None
    (tmp_path / "local").mkdir()
    assert hub_id(str(tmp_path / "local")) is None


ENCODERS = {"zoo_longformer", "zoo_bigbird", "zoo_reformer"}


def _load_text(text: str) -> str:
    (inner,) = re.findall(r"<!-- zoo:load -->(.*?)<!-- /zoo:load -->", text, re.DOTALL)
    return inner


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("remote_code", [False, True], ids=["saved", "exported"])
def test_every_architecture_card_says_how_to_load_it(model_type, remote_code):
    """Each template places the "how to load" text once; a saved model's card loads it after ``import zoo``, an
    export's with ``trust_remote_code=True``, in the architecture's words: an encoder names the classes for its
    masked-LM head, RMT its backbone."""
    config = tiny_config(model_type)
    assert template_for(config.model_type).count("{load}") == 1
    text = render_model_card(config, name="tiny", repo_id="me/tiny").text
    if remote_code:
        text = fill_template("{load}", {"load": load_section(config, "me/tiny", remote_code=True)})
    load = _load_text(text)
    base = config.model_type
    assert (", trust_remote_code=True)" in load) is remote_code
    assert ("import zoo" in load) is not remote_code
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny"' in load and "model.generate(" in load
    assert load.count(", trust_remote_code=True)") == (2 if remote_code else 0)  # model and tokenizer
    assert "AutoModelForSequenceClassification" in load
    assert ("AutoModelForMaskedLM" in load) is (base in ENCODERS)
    if base in ENCODERS:
        assert "causal variant" in load
    assert ("backbone (`zoo_transformer`)" in load or "zoo `zoo_transformer`" in load) is (base == "zoo_rmt")
    if remote_code:
        assert f"modeling_{base}.py" in load and "lm_eval --model hf" in load
        assert "pretrained=me/tiny,trust_remote_code=True" in load
    else:
        assert "python -m zoo.hub export" in load


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_encoder_saved_as_masked_lm_loads_with_its_masked_lm_class(model_type):
    from transformers import AutoModelForMaskedLM

    config = AutoModelForMaskedLM.from_config(tiny_config(model_type)).config
    config.architectures = [AutoModelForMaskedLM._model_mapping[type(config)].__name__]
    card = render_model_card(config, name="tiny", repo_id="me/mlm")
    assert card.data.pipeline_tag == "fill-mask"
    load = _load_text(fill_template("{load}", {"load": load_section(config, "me/mlm", remote_code=True)}))
    assert 'AutoModelForMaskedLM.from_pretrained("me/mlm", trust_remote_code=True)' in load
    assert "tokenizer.mask_token" in load and "model.generate(" not in load and "lm_eval" not in load
    assert f"masked-LM head (`{config.architectures[0]}`)" in load


def test_rmt_over_a_transformers_backbone_says_transformers_provides_it():
    from transformers import GPT2Config

    from zoo.models.rmt import RMTConfig

    backbone = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)
    config = RMTConfig(backbone=backbone, num_mem_tokens=2, segment_length=8)
    load = load_section(config, "me/rmt-gpt2", remote_code=True)
    assert "transformers' own `gpt2`" in load and "only the wrapper's code is in this folder" in load
