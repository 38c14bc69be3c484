"""lm-evaluation-harness (0.4.x) runs zoo models with its ``hf`` model type on the offline tasks of
``eval/lm_eval_tasks``: its loglikelihoods equal zoo's own scoring of the same continuations (computed here from
the model's logits), its greedy generations equal ``generate``'s, and recurrent models decode one token per step
there (their cache is used)."""

from __future__ import annotations

import functools
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM

import zoo
from tests.models.tiny_configs import tiny_config
from zoo.data.tokenizer import default_tokenizer

TASKS = Path(__file__).resolve().parents[2] / "eval" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.mark.parametrize("model_type", ["zoo_retnet", "zoo_transformer"])
def test_lm_eval_matches_zoo_scoring_and_generation(tmp_path, monkeypatch, task_manager, model_type):
    torch.manual_seed(0)
    folder = tmp_path / model_type
    AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(folder)
    tokenizer = default_tokenizer()
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()

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
    # zoo's byte tokenizer appends an end-of-sequence id by default: add_bos_token=False turns special tokens off
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32,backend=causal,add_bos_token=False",
        tasks=["zoo_tiny"],
        device="cpu",
        batch_size=2,
        task_manager=task_manager,
        log_samples=True,
    )
    monkeypatch.setattr(cls, "forward", forward)
    assert set(results["results"]) >= {"zoo_tiny_choice", "zoo_tiny_copy"}

    def encode(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    scored = 0
    for sample in results["samples"]["zoo_tiny_choice"]:
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
    assert scored == 18

    for sample in results["samples"]["zoo_tiny_copy"]:
        prompt, kwargs = sample["arguments"][0]
        ids = torch.tensor([encode(prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=kwargs["max_gen_toks"], do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == text

    # generate_until: after each prompt, one token per forward (the cache carries the state)
    assert lengths.count(1) >= 4
