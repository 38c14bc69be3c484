"""End to end: `python -m eval` on a tiny random Llama writes results, report, plots and model-index; a second run
recomputes nothing; runs merge into one report; the runner with an oracle predictor scores every cell 100 %."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

import eval.runner
from eval.__main__ import main, parse_length, parse_lengths
from eval.report import main as report_main
from eval.runner import Suite, run_suite
from eval.tasks import TASKS
from eval.tasks.text import real_text_corpus

TASK_SUBSET = "passkey,niah_multikey_essay,mqar,babi_qa1,listops,perplexity"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=4096,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    ByT5Tokenizer(extra_ids=0).save_pretrained(path)
    return str(path)


def test_parse_lengths():
    assert parse_lengths("1k,2k,4K,1500") == (1024, 2048, 4096, 1500)
    assert parse_length("1m") == 1024**2
    with pytest.raises(Exception, match="positive token count"):
        parse_length("zero")


def test_cli_end_to_end_and_resume(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "--model",
        model_dir,
        "--suite",
        "quick",
        "--lengths",
        "512",
        "--out",
        str(out),
        "--tasks",
        TASK_SUBSET,
    ]
    argv += ["--num-samples", "2", "--depths", "0,1", "--no-progress"]
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["model"] == model_dir and results["settings"]["seed"] == 0
    assert set(results["results"]["passkey"]["512"]) == {"0.00", "1.00"}
    for task in TASK_SUBSET.split(","):
        for score in results["results"][task]["512"].values():
            assert score is not None
    assert results["results"]["perplexity"]["512"]["last128"] > 1.0
    for name in ("report.md", "model_index.yaml", "predictions.jsonl", "accuracy_vs_length.png",
                 "perplexity_vs_length.png", "heatmap_passkey.png", "heatmap_niah_multikey_essay.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    index = yaml.safe_load((out / "model_index.yaml").read_text())
    assert index["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
    assert "```yaml" in (out / "report.md").read_text()
    # the real text of the essay haystacks, bAbI and perplexity is identified in the results and the report
    corpus = real_text_corpus()
    assert (
        results["corpus"] == corpus and corpus["name"] == "zoo.data.corpus:test" and corpus["documents"] > 0
    )
    assert results["tasks"]["perplexity"]["uses_real_text"] and not results["tasks"]["mqar"]["uses_real_text"]
    assert f"sha256 {corpus['sha256']}" in (out / "report.md").read_text()

    # resume: every cell is already there, so nothing is scored again
    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(eval.runner, "score_cell", refuse)
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["results"] == results["results"]

    with pytest.raises(ValueError, match="seed"):
        main([*argv, "--seed", "1"])


def test_report_merges_runs_with_rope_scaling(model_dir, tmp_path):
    common = [
        "--model",
        model_dir,
        "--lengths",
        "512",
        "--tasks",
        "perplexity",
        "--num-samples",
        "1",
        "--no-progress",
    ]
    main([*common, "--out", str(tmp_path / "base")])
    main([*common, "--out", str(tmp_path / "yarn"), "--rope-scaling", "yarn:4"])
    assert (
        report_main([str(tmp_path / "base"), str(tmp_path / "yarn"), "--out", str(tmp_path / "merged")]) == 0
    )
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "tiny_llama" in report and "(yarn:4)" in report
    assert len(yaml.safe_load((tmp_path / "merged" / "model_index.yaml").read_text())["model-index"]) == 2
    assert (tmp_path / "merged" / "perplexity_vs_length.png").exists()


class MetadataOracle:
    """Answers from the samples themselves: generation returns the references, the right choice scores 0."""

    def __init__(self, samples):
        self.by_prompt = {s.prompt: s for s in samples}

    def generate(self, prompts, max_new_tokens):
        return [" ".join(self.by_prompt[p].answers) for p in prompts]

    def loglikelihood(self, contexts, continuations):
        return [
            (0.0 if c == self.by_prompt[x].answers[0] else -1.0, 1) for x, c in zip(contexts, continuations)
        ]


def test_run_suite_with_oracle_scores_every_cell_100(tmp_path, monkeypatch):
    tokenizer = ByT5Tokenizer(extra_ids=0)
    suite = Suite(
        tasks=tuple(t for t in TASKS if t != "perplexity"), lengths=(512,), depths=(0.5,), num_samples=1
    )
    seen = []
    original = eval.runner.score_cell

    def score_with_oracle(task, samples, predictor, tok):
        seen.append(task.name)
        return original(task, samples, MetadataOracle(samples), tok)

    monkeypatch.setattr(eval.runner, "score_cell", score_with_oracle)
    results = run_suite(None, tokenizer, suite, tmp_path, {"model": "oracle", "seed": 0}, progress=False)
    scores = [
        v for by_length in results["results"].values() for cells in by_length.values() for v in cells.values()
    ]
    assert scores and all(v == 1.0 for v in scores)
    assert set(seen) == set(suite.tasks)


@pytest.fixture
def oracle_scores(monkeypatch):
    """The runner scores every cell with the metadata oracle (a perfect reader), whatever predictor it is given."""
    original = eval.runner.score_cell
    monkeypatch.setattr(
        eval.runner,
        "score_cell",
        lambda task, samples, _, tok: original(task, samples, MetadataOracle(samples), tok),
    )


def test_results_record_the_real_text_and_refuse_to_mix_corpora(tmp_path, monkeypatch, oracle_scores):
    tokenizer = ByT5Tokenizer(extra_ids=0)

    def suite(tasks, length):
        return Suite(tasks=tasks, lengths=(length,), depths=(0.5,), num_samples=1)

    settings = {"model": "oracle", "seed": 0}
    noise = run_suite(
        None, tokenizer, suite(("niah_single_noise",), 512), tmp_path / "noise", settings, progress=False
    )
    assert "corpus" not in noise  # no real text was read
    results = run_suite(
        None, tokenizer, suite(("babi_qa1",), 512), tmp_path / "real", settings, progress=False
    )
    assert results["corpus"] == real_text_corpus()

    # the corpus changed between two runs into one directory: the new cells would be scored on other text
    other = {**real_text_corpus(), "sha256": "0" * 16}
    monkeypatch.setattr(eval.runner, "real_text_corpus", lambda: other)
    with pytest.raises(ValueError, match="scored on the real-text corpus"):
        run_suite(None, tokenizer, suite(("babi_qa1",), 1024), tmp_path / "real", settings, progress=False)


def test_results_record_each_task_revision_and_refuse_to_mix_revisions(tmp_path, oracle_scores):
    """A task whose generator changed (its revision) is not resumed into a directory scored with the old prompts;
    a record written before revisions were recorded counts as revision 1."""
    tokenizer = ByT5Tokenizer(extra_ids=0)
    settings = {"model": "oracle", "seed": 0}

    def run(length):
        suite = Suite(tasks=("passkey",), lengths=(length,), depths=(0.5,), num_samples=1)
        return run_suite(None, tokenizer, suite, tmp_path / "run", settings, progress=False)

    assert run(256)["tasks"]["passkey"]["revision"] == TASKS["passkey"].revision == 2
    path = tmp_path / "run" / "results.json"
    old = json.loads(path.read_text())
    del old["tasks"]["passkey"]["revision"]  # as written before revisions were recorded
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="passkey with revision 1 of its generator, this run has revision 2"):
        run(512)
    assert json.loads(path.read_text()) == old  # nothing written


def _tiny_zoo_lm(model_type="zoo_transformer"):
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401
    from tests.models.tiny_configs import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


class CacheIgnored(torch.nn.Module):
    """A causal LM whose forward drops the cache it is given, as zoo's did when transformers renamed it: every
    decoding step then sees one token with no history."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **ignored):
        return self.inner(input_ids=input_ids, use_cache=use_cache)

    def generate(self, input_ids=None, max_new_tokens=1, **ignored):
        seq = input_ids
        for _ in range(max_new_tokens):
            nxt = self.inner(input_ids=seq[:, -1:], use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        return seq


@pytest.mark.parametrize("model_type", ["zoo_transformer", "zoo_retnet"])
def test_decoding_self_check_passes_and_is_recorded(model_type, tmp_path):
    from eval.predictors import HFPredictor

    tokenizer = ByT5Tokenizer(extra_ids=0)
    predictor = HFPredictor(_tiny_zoo_lm(model_type), tokenizer)
    suite = Suite(tasks=("passkey",), lengths=(256,), depths=(0.5,), num_samples=1)
    results = run_suite(predictor, tokenizer, suite, tmp_path, {"model": "tiny", "seed": 0}, progress=False)
    check = results["decoding_check"]
    assert check["checked"] and check["tokens_equal"] and check["logits_relative_error"] < 1e-5, check
    assert json.loads((tmp_path / "results.json").read_text())["decoding_check"] == check


def test_decoding_self_check_refuses_a_broken_cache_before_scoring(tmp_path):
    from eval.predictors import DecodingCheckFailed, HFPredictor

    tokenizer = ByT5Tokenizer(extra_ids=0)
    predictor = HFPredictor(CacheIgnored(_tiny_zoo_lm()), tokenizer)
    suite = Suite(tasks=("passkey",), lengths=(256,), depths=(0.5,), num_samples=1)
    with pytest.raises(DecodingCheckFailed, match="cached decoding disagrees with the full forward"):
        run_suite(predictor, tokenizer, suite, tmp_path, {"model": "broken", "seed": 0}, progress=False)
    assert not (tmp_path / "results.json").exists()


def _passkey_run(directory, check=None, revision=None, score=0.0):
    """A results.json of one passkey run, written into ``directory``."""
    info = {"metric": "accuracy", "variant_kind": "depth"}
    if revision is not None:
        info["revision"] = revision
    record = {
        "model": directory.name,
        "label": directory.name,
        "settings": {"suite": "quick", "seed": 0, "num_samples": 1},
        "tasks": {"passkey": info},
        "results": {"passkey": {"256": {"0.50": score}, "512": {"0.50": score}}},
        "samples": {},
        "skipped": {},
    }
    if check is not None:
        record["decoding_check"] = check
    directory.mkdir()
    (directory / "results.json").write_text(json.dumps(record))
    return directory


def test_report_flags_tasks_scored_zero_everywhere(tmp_path):
    from eval.report import write_report

    check = {"checked": True, "tokens_equal": True, "logits_relative_error": 1e-8}
    verified = _passkey_run(tmp_path / "verified", check)
    unverified = _passkey_run(tmp_path / "unverified")
    text = write_report([verified, unverified], tmp_path / "report").read_text()
    section = text.split("## Tasks scored 0 on every cell")[1].split("##")[0]
    assert "verified: passkey — cached decoding was verified" in section
    assert "unverified: passkey — **decoding path not verified**" in section
    assert "## Tasks scored on other prompts" not in text  # both revision 1 (recorded before revisions were)


def test_report_flags_runs_scored_with_other_generator_revisions(tmp_path):
    from eval.report import write_report

    old = _passkey_run(tmp_path / "old", score=1.0)  # no revision recorded: 1
    new = _passkey_run(tmp_path / "new", revision=2, score=0.5)
    text = write_report([old, new], tmp_path / "report").read_text()
    section = text.split("## Tasks scored on other prompts")[1].split("##")[0]
    assert "- passkey: old revision 1, new revision 2" in section
    same = _passkey_run(tmp_path / "same", revision=2, score=0.5)
    assert "other prompts" not in write_report([new, same], tmp_path / "report2").read_text()
