"""lm-evaluation-harness (0.4.x) runs zoo models with its ``hf`` model type on the offline tasks of
``eval/lm_eval_tasks``: its loglikelihoods equal zoo's own scoring of the same continuations (computed here from
the model's logits), its greedy generations equal ``generate``'s, and recurrent models decode one token per step
there (their cache is used). Both a saved model (``import zoo`` in the process) and an exported one (loaded with
``trust_remote_code=True`` in a process where zoo cannot be imported) are checked."""

from __future__ import annotations

import functools
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM

import zoo
from tests.hub.no_zoo_runner import lm_eval_without_zoo
from tests.models.tiny_configs import tiny_config
from zoo.data.tokenizer import default_tokenizer
from zoo.hub.export import export

TASKS = Path(__file__).resolve().parents[2] / "eval" / "lm_eval_tasks"
# zoo's byte tokenizer appends an end-of-sequence id by default: add_bos_token=False turns special tokens off
MODEL_ARGS = "dtype=float32,backend=causal,add_bos_token=False"


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def save_tiny(model_type: str, folder: Path):
    """A tiny randomly initialised ``model_type`` saved with zoo's byte tokenizer; returns (model, tokenizer)."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(folder)
    tokenizer = default_tokenizer()
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def check_loglikelihoods(samples: list[dict], model, tokenizer) -> int:
    """Each (context, continuation) lm_eval scored: its loglikelihood and greediness equal zoo's own scoring from
    the model's logits over context + continuation; returns how many were checked."""

    def encode(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    scored = 0
    for sample in samples:
        for (context, continuation), (loglikelihood, is_greedy) in zip(
            sample["arguments"], sample["filtered_resps"], strict=True
        ):
            ctx, cont = encode(context), encode(continuation)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            # the token at position i is predicted by the logits at i - 1
            rows = logprobs[len(ctx) - 1 : -1]
            expected = rows[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
            assert loglikelihood == pytest.approx(expected, rel=1e-5, abs=1e-4)
            assert is_greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
            scored += 1
    return scored


def check_generations(samples: list[dict], model, tokenizer) -> None:
    """lm_eval's ``generate_until`` answers equal zoo's greedy ``generate`` cut at the first stop string."""
    for sample in samples:
        prompt, kwargs = sample["arguments"][0]
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=kwargs["max_gen_toks"], do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == text


@pytest.mark.parametrize("model_type", ["zoo_retnet", "zoo_transformer"])
def test_lm_eval_matches_zoo_scoring_and_generation(tmp_path, monkeypatch, task_manager, model_type):
    folder = tmp_path / model_type
    model, tokenizer = save_tiny(model_type, folder)

    # every forward of the class lm_eval loads, with the number of tokens it was given
    lengths = []
    cls = zoo.REGISTRY[model_type].causal_lm
    forward = cls.forward

    @functools.wraps(forward)
    def counting_forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(ids.shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting_forward)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},{MODEL_ARGS}",
        tasks=["zoo_tiny"],
        device="cpu",
        batch_size=2,
        task_manager=task_manager,
        log_samples=True,
    )
    monkeypatch.setattr(cls, "forward", forward)
    assert set(results["results"]) >= {"zoo_tiny_choice", "zoo_tiny_copy"}
    assert check_loglikelihoods(results["samples"]["zoo_tiny_choice"], model, tokenizer) == 18
    check_generations(results["samples"]["zoo_tiny_copy"], model, tokenizer)
    # generate_until: after each prompt, one token per forward (the cache carries the state)
    assert lengths.count(1) >= 4


@pytest.mark.slow
def test_lm_eval_on_an_export_without_zoo(tmp_path):
    """``lm_eval`` with ``pretrained=<exported folder>,trust_remote_code=True`` in a process where zoo cannot be
    imported: the loglikelihoods and generations equal zoo's own from the saved model; under ``generate_until``
    the recurrent RetNet is fed its prompt once, then one token per step, its cache the same size at every step
    (O(1) decoding, as in ``generate``)."""
    model, tokenizer = save_tiny("zoo_retnet", tmp_path / "saved")
    exported = export(tmp_path / "saved", tmp_path / "exported")
    out = lm_eval_without_zoo(exported, TASKS, ["zoo_tiny"], tmp_path / "run", model_args=MODEL_ARGS)

    assert not out["zoo_imported"] and out["class_modules"]
    assert all(m.startswith("transformers_modules.") for m in out["class_modules"]), out["class_modules"]
    assert set(out["tasks"]) >= {"zoo_tiny_choice", "zoo_tiny_copy"}
    assert check_loglikelihoods(out["samples"]["zoo_tiny_choice"], model, tokenizer) == 18
    check_generations(out["samples"]["zoo_tiny_copy"], model, tokenizer)

    # the forwards of each generate call: the prompt (padded to the batch's longest), then single tokens
    calls: dict[int, list[dict]] = {}
    for forward in out["forwards"]:
        if forward["generate_call"] is not None:
            calls.setdefault(forward["generate_call"], []).append(forward)
    assert len(calls) == 2  # 4 prompts, batch size 2
    for forwards in calls.values():
        prefill, *steps = forwards
        assert prefill["length"] > 1 and len(steps) >= 1
        assert [f["length"] for f in steps] == [1] * len(steps)
        assert {f["cache_class"] for f in forwards} == {"RecurrentCache"}
        assert {f["cache_numel"] for f in forwards} == {prefill["cache_numel"]} and prefill["cache_numel"] > 0
    # scoring (outside generate) runs full sequences without decoding step by step
    scoring = [f for f in out["forwards"] if f["generate_call"] is None]
    assert scoring and all(f["length"] > 1 for f in scoring)
