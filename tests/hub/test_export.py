"""Self-contained export: every registered architecture loads with ``trust_remote_code=True`` where zoo cannot be
imported, and gives the original model's logits and greedy generation.

All exported folders are loaded by ONE subprocess (``no_zoo_runner.py``), which removes the repository and the
editable install of zoo from its import path and checks that ``import zoo`` fails before loading anything.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports

import zoo
from tests.hub.no_zoo_runner import load_without_zoo
from tests.models.tiny_configs import TINY, model_type_of, tiny_config
from zoo.hub.__main__ import main
from zoo.hub.export import ExportError, export, requirements_text

ENCODERS = {"zoo_longformer", "zoo_bigbird", "zoo_reformer"}
# every TINY entry (variants included) of a registered architecture: a new architecture is picked up by itself
CASES = sorted(k for k in TINY if model_type_of(k) in zoo.REGISTRY)
NEW_TOKENS = 4


def test_every_registered_architecture_is_exported():
    assert set(zoo.REGISTRY) <= {model_type_of(k) for k in CASES}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case saved, exported and loaded in the zoo-free subprocess: {case: (reference, loaded, out_dir)}."""
    root = tmp_path_factory.mktemp("export")
    reference, spec = {}, {}
    for i, case in enumerate(CASES):
        torch.manual_seed(i)
        config = tiny_config(case)
        model = AutoModelForCausalLM.from_config(config).eval()
        # padding-free inputs of ordinary tokens (above the special ids); RMT's spans several segments
        ids = torch.randint(3, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            generated = model.generate(
                ids[:1, :7], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
        src, out = root / "src" / case, root / "out" / case.replace("@", "_")
        model.save_pretrained(src)
        export(src, out)
        torch.save(ids, out / "ids.pt")
        reference[case] = {"logits": logits, "generated": generated}
        spec[case] = str(out)
    loaded = load_without_zoo(spec, root / "run", new_tokens=NEW_TOKENS)
    return {case: (reference[case], loaded[case], Path(spec[case])) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_export_loads_without_zoo_with_equal_logits_and_generation(exported, case):
    reference, loaded, _ = exported[case]
    assert loaded["class_module"].startswith("transformers_modules."), loaded["class_module"]
    assert not loaded["zoo_imported"]
    torch.testing.assert_close(loaded["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(loaded["generated"], reference["generated"])
    assert loaded["generated"].shape[1] == 7 + NEW_TOKENS


@pytest.mark.parametrize("case", CASES)
def test_export_folder_is_self_contained(exported, case):
    """Only torch, transformers (and huggingface_hub, which it requires) outside ``try`` blocks; no model
    package ``__init__`` (which would register architectures); auto_map, weights and card present."""
    _, _, out = exported[case]
    allowed = {"torch", "transformers", "huggingface_hub", *sys.stdlib_module_names}
    for path in out.glob("*.py"):
        assert set(get_imports(path)) <= allowed, (path.name, set(get_imports(path)) - allowed)
        assert not re.search(r"^\s*(from|import)\s+zoo\b", path.read_text(), re.MULTILINE), path.name
    names = {p.stem for p in out.glob("*.py")}
    packages = {f"zoo_models_{t.removeprefix('zoo_')}" for t in zoo.REGISTRY}
    assert not names & (packages | {"zoo", "zoo_models", "zoo_models_registry"})
    config = json.loads((out / "config.json").read_text())
    model_type = model_type_of(case)
    encoder = {"AutoModelForMaskedLM"} if model_type in ENCODERS else set()
    if model_type == "zoo_longformer":
        encoder |= {"AutoModelForQuestionAnswering", "AutoModelForTokenClassification"}
    if model_type == "zoo_bigbird":
        encoder |= {"AutoModelForQuestionAnswering"}
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        *encoder,
    }
    assert all(ref.startswith(f"modeling_{model_type}.") for ref in config["auto_map"].values())
    assert (out / "model.safetensors").is_file()
    card = ModelCard.load(out / "README.md")
    assert "custom_code" in card.data.tags and model_type in card.data.tags
    load = card.text.split("<!-- zoo:load -->")[1].split("<!-- /zoo:load -->")[0]
    assert '.from_pretrained("' in load and "trust_remote_code=True)" in load and "import zoo" not in load
    assert f"modeling_{model_type}.py" in load and "transformers>=" in load
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert requirements_text().splitlines() == requirements


def test_requirements_pin_the_supported_versions():
    """torch and transformers in the ranges of zoo's own requirements (setup.cfg); triton commented out, as
    optional and for CUDA only."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(Path(zoo.__file__).resolve().parents[1] / "setup.cfg")
    declared = {
        Requirement(line).name: Requirement(line).specifier
        for line in parser.get("options", "install_requires").split("\n")
        if line.strip()
    }
    lines = requirements_text().splitlines()
    active = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert [r.name for r in active] == ["torch", "transformers"]
    assert all(r.specifier == declared[r.name] for r in active)
    assert Version(transformers.__version__) in active[1].specifier and "," in str(active[1].specifier)
    (triton,) = [line for line in lines if line.startswith("# triton")]
    assert Requirement(triton.removeprefix("# ")).specifier == declared["triton"]
    assert any("CUDA" in line and "Optional" in line for line in lines)


def test_export_includes_triton_kernels_behind_a_guard(exported):
    _, _, out = exported["zoo_retnet"]
    text = (out / "zoo_ops_retention_triton.py").read_text()
    assert "try:\n    import triton\n" in text
    dispatch = (out / "zoo_ops_retention.py").read_text()
    assert "from . import zoo_ops_retention_triton as triton_impl" in dispatch


def test_rmt_export_carries_its_backbone(exported):
    _, _, out = exported["zoo_rmt"]
    assert (out / "zoo_models_transformer_modeling_transformer.py").is_file()
    assert 'AutoConfig.register("zoo_transformer"' in (out / "modeling_zoo_rmt.py").read_text()


def test_export_cli_and_bad_input(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config("zoo_transformer"))
    model.save_pretrained(tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "modeling_zoo_transformer.py").is_file()
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "out")]) == 2  # not empty
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "out"), "--overwrite"]) == 0
    with pytest.raises(ExportError, match="no config.json"):
        export(tmp_path, tmp_path / "other")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="not a zoo architecture"):
        export(tmp_path / "llama", tmp_path / "other")
