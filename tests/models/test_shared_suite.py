"""The checks every registered architecture must pass (parametrised over ``zoo.REGISTRY``)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import zoo
from tests.models.decoding import full_and_incremental_logits
from tests.models.tiny_configs import TINY, model_type_of, tiny_config
from zoo.models import default_lora_targets
from zoo.models.utils import CACHE_NAME, output_cache
from zoo.modules import RecurrentCache

# every tiny config, variants of a model_type (such as RWKV versions) included
ARCHS = sorted(TINY)
VOCAB_LO = 3  # ids below are special tokens of the byte tokenizer


def causal_lm(model_type, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    return model.eval()


def tokens(batch, length, vocab=259, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB_LO, vocab, (batch, length), generator=g)


def test_every_architecture_has_a_tiny_config():
    assert ARCHS, "no architecture is registered"
    types = {model_type_of(a) for a in ARCHS}
    assert set(zoo.REGISTRY) == types, f"tiny configs missing for {set(zoo.REGISTRY) - types}"


@pytest.mark.parametrize("model_type", ARCHS)
def test_forward_backward(model_type):
    model = causal_lm(model_type).train()
    ids = tokens(2, 17)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 17, model.config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("model_type", ARCHS)
def test_bf16_autocast_forward_backward(model_type):
    """Mixed precision as accelerate runs it on CPU (bf16 autocast): trains, and stays near the float32 logits."""
    model = causal_lm(model_type).train()
    ids = tokens(2, 33)
    with torch.no_grad():
        ref = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    err = (out.logits.float() - ref).norm() / ref.norm()
    assert err < 5e-2, f"bf16 autocast logits differ from float32 by {err:.2e} (relative)"


@pytest.mark.parametrize("model_type", ARCHS)
def test_bf16_weights_forward_backward_and_decode(model_type):
    """The whole model in bf16 (``model.to(torch.bfloat16)``, as bf16 inference and the GPU bench run it): trains,
    decodes with its cache, and stays near the float32 logits."""
    model = causal_lm(model_type).train()
    ids = tokens(2, 33)
    with torch.no_grad():
        ref = model(ids).logits
    model = model.to(torch.bfloat16)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    err = (out.logits.float() - ref).norm() / ref.norm()
    assert err < 5e-2, f"bf16 logits differ from float32 by {err:.2e} (relative)"
    with torch.no_grad():
        generated = model.eval().generate(ids[:1, :9], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 12)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(model_type, tied, tmp_path):
    model = causal_lm(model_type, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files), files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids = tokens(2, 9)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is tied


@pytest.mark.parametrize("model_type", ARCHS)
def test_round_trip_keeps_every_buffer(model_type, tmp_path):
    """Buffers, the non-persistent ones that transformers' loading leaves empty included, equal the saved
    model's after ``from_pretrained``."""
    model = causal_lm(model_type)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = dict(model.named_buffers())
    got = dict(loaded.named_buffers())
    assert got.keys() == expected.keys()
    for name, buffer in expected.items():
        torch.testing.assert_close(got[name], buffer, rtol=0, atol=0, msg=f"buffer {name} changed")


@pytest.mark.parametrize("model_type", ARCHS)
def test_auto_classes(model_type, tmp_path):
    config = tiny_config(model_type)
    assert type(AutoConfig.for_model(model_type_of(model_type))) is type(config)
    entry = zoo.REGISTRY[model_type_of(model_type)]
    causal_lm(model_type).save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is entry.causal_lm
    assert type(AutoModel.from_pretrained(tmp_path)) is entry.model
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(classifier) is entry.sequence_classification


@pytest.mark.parametrize("model_type", ARCHS)
def test_sequence_classification(model_type):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=3))
    ids = tokens(4, 12)
    out = model(ids, labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3)
    out.loss.backward()
    assert model.score.weight.grad is not None


@pytest.mark.parametrize("model_type", ARCHS)
def test_generate_with_cache_equals_greedy_without(model_type):
    model = causal_lm(model_type)
    ids = tokens(2, 7)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    torch.testing.assert_close(with_cache, without, rtol=0, atol=0)
    # And both equal argmax over the full forward, token by token.
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(with_cache, seq, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ARCHS)
def test_prefix_then_token_by_token_equals_full_forward(model_type):
    model = causal_lm(model_type)
    full, incremental, _ = full_and_incremental_logits(model, tokens(2, 12), prefix=5)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_by_one(model_type, side):
    model = causal_lm(model_type)
    lengths = [9, 5, 7]
    seqs = [tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        for i, s in enumerate(seqs):
            alone = model(s[None], use_cache=False).logits[0]
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(batched[i, sl], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_torch_compile_matches_eager(model_type, padded):
    """torch.compile traces the model (forward and backward through AOTAutograd; the ``aot_eager`` backend skips
    only inductor's code generation) with the eager loss and gradients, and the graph breaks only where an op
    is deliberately left eager (``torch.compiler.disable``), never on data-dependent Python branches."""
    import torch._dynamo as dynamo

    model = causal_lm(model_type).train()
    ids = tokens(2, 24)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    kwargs = {"attention_mask": mask} if padded else {}

    def loss_and_grads(m):
        model.zero_grad(set_to_none=True)
        loss = m(ids, labels=ids, use_cache=False, **kwargs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads(model)
    dynamo.reset()
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    dynamo.reset()
    explained = dynamo.explain(lambda i: model(i, labels=i, use_cache=False, **kwargs).loss)(ids)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    unexpected = [r for r in reasons if "torch.compiler.disable" not in r]
    assert not unexpected, unexpected


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("use_cache", [None, True, False])
def test_packed_documents_equal_separate(model_type, mode, use_cache):
    """No state or attention crosses a document boundary, with each model's defaults (``use_cache=None``: the
    cache is on at inference), in train and eval mode (dropout is 0 in the tiny configs), cache on and off."""
    model = causal_lm(model_type).train(mode == "train")
    docs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate([6, 9, 4])]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, use_cache=use_cache).logits[0]
        alone = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def _keeps_only_a_state(model_type) -> bool:
    with torch.no_grad():
        cache = output_cache(causal_lm(model_type)(tokens(1, 2), use_cache=True))
    return isinstance(cache, RecurrentCache)


# A KV cache keeps every document's keys, so only models whose cache is a recurrent state can go on decoding
# after a packed prefill; attention models decode from unpacked prompts.
STATE_ARCHS = [t for t in ARCHS if _keeps_only_a_state(t)]


@pytest.mark.parametrize("model_type", STATE_ARCHS)
def test_decoding_goes_on_from_the_last_packed_document(model_type):
    """After a packed prefill with the cache, the next token continues each row's last document only."""
    model = causal_lm(model_type)
    docs = [tokens(1, n, seed=20 + i)[0] for i, n in enumerate([5, 7])]
    nxt = tokens(1, 1, seed=30)
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        out = model(ids, position_ids=position_ids, use_cache=True)
        step = model(
            nxt, position_ids=torch.tensor([[len(docs[-1])]]), use_cache=True, cache=output_cache(out)
        )
        alone = model(torch.cat([docs[-1][None], nxt], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("head", ["model", "causal_lm", "sequence_classification"])
def test_misspelt_keyword_is_a_type_error(model_type, head):
    """An unknown keyword is never swallowed: a renamed argument upstream must fail loudly, naming it."""
    cls = getattr(zoo.REGISTRY[model_type_of(model_type)], head)
    torch.manual_seed(0)
    model = cls(tiny_config(model_type, num_labels=2)).eval()
    ids = tokens(1, 5)
    with pytest.raises(TypeError, match="atention_mask.*did you mean 'attention_mask'"):
        model(ids, atention_mask=torch.ones_like(ids))
    with pytest.raises(TypeError, match="'cache_positions'"):
        model(ids, cache_positions=torch.arange(5))


@pytest.mark.parametrize("model_type", ARCHS)
def test_cache_under_either_name(model_type):
    """The cache is accepted as ``cache`` (transformers >= 5.24) and ``past_key_values`` (before), and outputs
    carry it under the installed transformers' field name."""
    model = causal_lm(model_type)
    ids = tokens(1, 9)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        by_name = {}
        for name in ("cache", "past_key_values"):
            prefix = model(ids[:, :-1], use_cache=True)
            by_name[name] = model(ids[:, -1:], use_cache=True, **{name: output_cache(prefix)}).logits[:, -1]
            torch.testing.assert_close(by_name[name], full, rtol=1e-4, atol=1e-5)
        prefix = model(ids[:, :-1], use_cache=True)
        with pytest.raises(TypeError, match="pass the cache once"):
            model(ids[:, -1:], cache=output_cache(prefix), past_key_values=output_cache(prefix))
    assert CACHE_NAME in type(prefix).__dataclass_fields__


@pytest.mark.parametrize("model_type", ARCHS)
def test_gradient_checkpointing_gives_same_gradients(model_type):
    ids = tokens(2, 11)
    grads = []
    for checkpointing in (False, True):
        model = causal_lm(model_type).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", ARCHS)
def test_lora_attaches_and_trains(model_type):
    from peft import LoraConfig, get_peft_model

    model = causal_lm(model_type).train()
    targets = default_lora_targets(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora_names, f"LoRA found none of {targets}"
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_names)
    ids = tokens(4, 16)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("model_type", ARCHS)
def test_token_outside_vocab_is_an_error(model_type):
    model = causal_lm(model_type)
    bad = torch.tensor([[5, 6, model.config.vocab_size + 3]])
    with pytest.raises(ValueError, match=str(model.config.vocab_size + 3)):
        model(bad)
    with pytest.raises(ValueError, match="-1"):
        model(torch.tensor([[5, -1]]))


@pytest.mark.parametrize("model_type", ARCHS)
def test_unknown_config_field_is_an_error(model_type):
    with pytest.raises(ValueError, match="hiden_size"):
        tiny_config(model_type, hiden_size=8)
