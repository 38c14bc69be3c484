"""HFPredictor against a tiny random Llama: batched log-likelihoods equal single ones and a plain forward pass,
generation runs batched, and --rope-scaling reaches the model's config."""

from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from eval.predictors import HFPredictor, load_model, parse_rope_scaling
from zoo.positional import rope_parameters_for


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval(), ByT5Tokenizer(extra_ids=0)


def test_loglikelihood_matches_forward_and_is_batch_invariant(tiny):
    model, tokenizer = tiny
    contexts = ["The pass key is", "A much longer context with more words in it, so padding is needed:", "x"]
    continuations = [" 12345", " yes", " kitchen"]
    batched = HFPredictor(model, tokenizer, batch_size=3).loglikelihood(contexts, continuations)
    single = HFPredictor(model, tokenizer, batch_size=1).loglikelihood(contexts, continuations)
    for (a, n), (b, m) in zip(batched, single):
        assert n == m
        assert a == pytest.approx(b, abs=1e-4)

    ids = tokenizer(contexts[0] + continuations[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    start = len(tokenizer(contexts[0], add_special_tokens=False)["input_ids"])
    expected = sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids)))
    assert batched[0] == (pytest.approx(expected, abs=1e-4), len(ids) - start)


def test_generate_batched(tiny):
    model, tokenizer = tiny
    prompts = ["same length a", "same length b", "a different, longer prompt"]
    batched = HFPredictor(model, tokenizer, batch_size=2).generate(prompts, max_new_tokens=5)
    single = HFPredictor(model, tokenizer, batch_size=1).generate(prompts[:2], max_new_tokens=5)
    assert len(batched) == 3 and all(isinstance(x, str) for x in batched)
    assert batched[:2] == single


def test_rope_scaling_spec():
    assert parse_rope_scaling("yarn:4") == ("yarn", 4.0)
    for bad in ("yarn", "yarn:x", ":4", "yarn:-1"):
        with pytest.raises(ValueError, match="METHOD:FACTOR"):
            parse_rope_scaling(bad)
    config = LlamaConfig(max_position_embeddings=2048)
    params = rope_parameters_for(config, "yarn", 4.0)
    assert params["rope_type"] == "yarn" and params["original_max_position_embeddings"] == 2048
    with pytest.raises(ValueError, match="xpos"):
        rope_parameters_for(config, "xpos", 2.0)


def test_load_model_with_rope_scaling(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), rope_scaling="linear:2")
    assert len(loaded_tokenizer) == 259
    # through zoo.extend_context or through rope_parameters at load time, the config records the scaling
    assert loaded.config.rope_parameters["rope_type"] == "linear"
    assert loaded.config.rope_parameters["factor"] == 2.0


@pytest.mark.parametrize("arch", ["llama", "zoo_transformer", "zoo_retnet"])
def test_shared_context_choices_equal_independent_scoring(tiny, arch):
    """Multiple choice reads the context once and scores each continuation from a copy of the cache."""
    model, tokenizer = tiny
    if arch != "llama":
        from transformers import AutoConfig, AutoModelForCausalLM

        import zoo  # noqa: F401

        torch.manual_seed(0)
        config = AutoConfig.for_model(
            arch, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        model = AutoModelForCausalLM.from_config(config).eval()
    context = "Mary went to the kitchen. John went to the garden. Where is Mary? Answer:"
    choices = [" kitchen", " garden", " hallway", " office", " a"]
    predictor = HFPredictor(model, tokenizer, batch_size=2)
    shared = predictor.loglikelihood([context] * len(choices), choices)
    predictor._caches = False
    independent = predictor.loglikelihood([context] * len(choices), choices)
    for (a, n), (b, m) in zip(shared, independent):
        assert n == m and a == pytest.approx(b, abs=1e-4)


def test_choice_accuracy_metric_loads_offline_through_evaluate():
    from eval.metrics import load_metric

    metric = load_metric("choice_accuracy")
    assert metric.compute(predictions=["a", "b", "c"], references=["a", "x", "c"])[
        "accuracy"
    ] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no metric 'bleu'"):
        load_metric("bleu")
