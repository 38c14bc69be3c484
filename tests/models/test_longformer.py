"""Longformer against transformers' ``Longformer*`` classes (same weights through ``zoo.convert``): masked-LM
logits with global tokens and padding, the task heads with their default global attention, the conversion both
ways and the command line; the encoder classes' generic checks; the causal variant against transformers'
``RobertaForCausalLM`` given the sliding window as its attention mask, and its window-sized cache."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LongformerConfig,
    LongformerForMaskedLM,
    RobertaConfig,
    RobertaForCausalLM,
)

import zoo  # noqa: F401
from tests.models.tiny_configs import tiny_config
from zoo.convert import main as convert_main
from zoo.models.longformer import (
    ZooLongformerConfig,
    ZooLongformerForCausalLM,
    ZooLongformerForMaskedLM,
    ZooLongformerForQuestionAnswering,
    ZooLongformerForSequenceClassification,
    ZooLongformerForTokenClassification,
    ZooLongformerModel,
)
from zoo.models.longformer.convert_longformer import _to_zoo_name, from_transformers, to_transformers
from zoo.models.utils import output_cache

SIZES = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    attention_window=[4, 8, 4],  # one-sided 2, 4, 2 (transformers pads to a multiple of the largest)
    max_position_embeddings=80,
    type_vocab_size=2,
    layer_norm_eps=1e-5,
)
PAD, SEP = 1, 2


def hf_longformer(cls=LongformerForMaskedLM, **overrides):
    torch.manual_seed(0)
    model = cls(LongformerConfig(**{**SIZES, **overrides})).eval()
    with torch.no_grad():  # away from initialisation, so that every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def batch(T=29, pad_to=(None, 18), seed=0):
    """Ids, attention mask (right padding with the pad id) and a global mask at the start, middle and end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SIZES["vocab_size"], (2, T), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad_to):
        if n is not None:
            ids[row, n:], mask[row, n:] = PAD, 0
    glob = torch.zeros_like(ids)
    glob[0, [0, T // 2, T - 1]] = 1
    glob[1, [0, T // 3]] = 1
    return ids, mask, glob


@pytest.mark.parametrize(
    "windows, with_globals, T",
    [
        ([4, 8, 4], True, 29),
        ([4, 8, 4], False, 29),
        ([6, 6, 6], True, 29),  # one-sided 3: odd
        ([4, 8, 4], True, 8),  # one window
    ],
)
def test_masked_lm_logits_equal_transformers(windows, with_globals, T):
    hf = hf_longformer(attention_window=windows)
    ours = from_transformers(hf).eval()
    assert isinstance(ours, ZooLongformerForMaskedLM)
    ids, mask, glob = batch(T, pad_to=(None, T - 3))
    kwargs = {"attention_mask": mask, "global_attention_mask": glob if with_globals else None}
    with torch.no_grad():
        expected = hf(ids, **kwargs).logits
        got = ours(ids, **kwargs).logits
    real = mask.bool()
    assert rel_err(got[real], expected[real]) < 1e-5


def test_token_types_equal_transformers():
    hf = hf_longformer()
    ours = from_transformers(hf).eval()
    ids, mask, glob = batch()
    types = (torch.arange(ids.shape[1]) > 10).long().expand_as(ids)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, global_attention_mask=glob, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, global_attention_mask=glob, token_type_ids=types).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5


def _with_backbone(zoo_cls, hf_cls, head_renames, num_labels=3):
    """A transformers task model and zoo's, both holding the masked-LM backbone's weights and the same head."""
    hf_mlm = hf_longformer()
    hf = hf_longformer(hf_cls, num_labels=num_labels)
    hf.longformer.load_state_dict(hf_mlm.longformer.state_dict(), strict=False)
    config = from_transformers(hf_mlm).config
    config.num_labels = num_labels
    ours = zoo_cls(config).eval()
    ours.model.load_state_dict(from_transformers(hf_mlm).model.state_dict())
    state = hf.state_dict()
    with torch.no_grad():
        for hf_name, zoo_name in head_renames.items():
            ours.get_parameter(zoo_name).copy_(state[hf_name])
    return hf, ours


def test_sequence_classification_equals_transformers():
    """Global attention on the first token by default, RoBERTa's head on it."""
    hf, ours = _with_backbone(
        ZooLongformerForSequenceClassification,
        transformers.LongformerForSequenceClassification,
        {
            "classifier.dense.weight": "dense.weight",
            "classifier.dense.bias": "dense.bias",
            "classifier.out_proj.weight": "score.weight",
            "classifier.out_proj.bias": "score.bias",
        },
    )
    ids, mask, _ = batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert rel_err(got, expected) < 1e-5


def test_question_answering_equals_transformers():
    """The question (the tokens before the first separator) gets global attention by default."""
    hf, ours = _with_backbone(
        ZooLongformerForQuestionAnswering,
        transformers.LongformerForQuestionAnswering,
        {"qa_outputs.weight": "qa_outputs.weight", "qa_outputs.bias": "qa_outputs.bias"},
        num_labels=2,
    )
    ids, mask, _ = batch(pad_to=(None, None))
    ids[ids == SEP] = 5
    ids[0, [6, 7, 28]] = SEP  # question, two separators, context, a final separator (transformers' layout)
    ids[1, [3, 4, 28]] = SEP
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
    assert rel_err(got.start_logits, expected.start_logits) < 1e-5
    assert rel_err(got.end_logits, expected.end_logits) < 1e-5
    out = ours(ids, start_positions=torch.tensor([9, 10]), end_positions=torch.tensor([12, 14]))
    out.loss.backward()
    with pytest.raises(ValueError, match="sep_token_id"):
        ours(torch.full((1, 6), 7))


def test_token_classification_equals_transformers():
    hf, ours = _with_backbone(
        ZooLongformerForTokenClassification,
        transformers.LongformerForTokenClassification,
        {"classifier.weight": "score.weight", "classifier.bias": "score.bias"},
    )
    ids, mask, glob = batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, global_attention_mask=glob).logits
        got = ours(ids, attention_mask=mask, global_attention_mask=glob).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5


def test_conversion_back_and_the_command_line(tmp_path):
    hf = hf_longformer()
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    ours = AutoModelForMaskedLM.from_pretrained(tmp_path / "zoo").eval()
    assert isinstance(ours, ZooLongformerForMaskedLM)
    assert convert_main([str(tmp_path / "zoo"), str(tmp_path / "back")]) == 0
    back = LongformerForMaskedLM.from_pretrained(tmp_path / "back").eval()
    ids, mask, glob = batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, global_attention_mask=glob).logits
        got = ours(ids, attention_mask=mask, global_attention_mask=glob).logits
        again = back(ids, attention_mask=mask, global_attention_mask=glob).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    causal = ZooLongformerForCausalLM(ours.config)
    with pytest.raises(ValueError, match="causal"):
        to_transformers(causal)


def _qa_batch():
    """Question, two separators, context, a final separator (transformers' QA layout), no padding."""
    ids, mask, _ = batch(pad_to=(None, None))
    ids[ids == SEP] = 5
    ids[0, [6, 7, 28]] = SEP
    ids[1, [3, 4, 28]] = SEP
    return ids, mask, None


HEADS = [
    # (transformers class, zoo's Auto class, num_labels, inputs: global tokens given or the head's default)
    (LongformerForMaskedLM, AutoModelForMaskedLM, 2, batch),
    (
        transformers.LongformerForSequenceClassification,
        AutoModelForSequenceClassification,
        3,
        lambda: (*batch()[:2], None),
    ),
    (transformers.LongformerForTokenClassification, AutoModelForTokenClassification, 4, batch),
    (transformers.LongformerForQuestionAnswering, AutoModelForQuestionAnswering, 2, _qa_batch),
]


@pytest.mark.parametrize("hf_cls, auto, num_labels, inputs", HEADS, ids=lambda h: getattr(h, "__name__", ""))
def test_every_head_round_trips(hf_cls, auto, num_labels, inputs, tmp_path):
    """transformers -> zoo -> transformers through ``python -m zoo.convert`` for each head: the same class back,
    the same weights and labels, and equal outputs (original vs back-converted, zoo vs transformers)."""
    hf = hf_longformer(hf_cls, num_labels=num_labels, id2label={i: f"tag{i}" for i in range(num_labels)})
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert convert_main([str(tmp_path / "zoo"), str(tmp_path / "back")]) == 0
    ours = auto.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours).__name__ == "Zoo" + hf_cls.__name__
    back = hf_cls.from_pretrained(tmp_path / "back").eval()
    assert back.config.id2label == hf.config.id2label and ours.config.num_labels == num_labels
    assert back.state_dict().keys() == hf.state_dict().keys()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    ids, mask, glob = inputs()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, global_attention_mask=glob)
        again = back(ids, attention_mask=mask, global_attention_mask=glob)
        got = ours(ids, attention_mask=mask, global_attention_mask=glob)
    names = (
        ("start_logits", "end_logits")
        if hf_cls is transformers.LongformerForQuestionAnswering
        else ("logits",)
    )
    real = mask.bool()
    for name in names:
        a, b, z = getattr(again, name), getattr(expected, name), getattr(got, name)
        if a.dim() > 2:  # per-token outputs: the real tokens
            a, b, z = a[real], b[real], z[real]
        assert rel_err(a, b) < 1e-5, name
        assert rel_err(z, a) < 1e-5, name


def test_conversion_refuses_what_has_no_counterpart():
    with pytest.raises(ValueError, match="num_labels=2"):
        from_transformers(hf_longformer(transformers.LongformerForQuestionAnswering, num_labels=3))
    with pytest.raises(ValueError, match="no zoo counterpart"):
        from_transformers(hf_longformer(transformers.LongformerModel))
    with pytest.raises(ValueError, match="no transformers counterpart"):
        to_transformers(ZooLongformerModel(from_transformers(hf_longformer()).config))


ENCODERS = [
    (ZooLongformerForMaskedLM, AutoModelForMaskedLM),
    (ZooLongformerForSequenceClassification, AutoModelForSequenceClassification),
    (ZooLongformerForQuestionAnswering, AutoModelForQuestionAnswering),
    (ZooLongformerForTokenClassification, AutoModelForTokenClassification),
    (ZooLongformerModel, AutoModel),
]


def encoder(cls, **overrides):
    torch.manual_seed(0)
    config = tiny_config("zoo_longformer", num_labels=3, **overrides)
    return cls(config).eval()


def _main_output(out):
    for name in ("start_logits", "logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output in {type(out).__name__}")


def _glob(ids):
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    glob[:, 5] = 1
    return glob


@pytest.mark.parametrize("cls, auto", ENCODERS, ids=lambda c: getattr(c, "__name__", ""))
def test_encoder_save_load_and_auto_classes(cls, auto, tmp_path):
    model = encoder(cls)
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    ids = torch.randint(3, 259, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            _main_output(loaded(ids, global_attention_mask=_glob(ids))),
            _main_output(model(ids, global_attention_mask=_glob(ids))),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("cls", [c for c, _ in ENCODERS], ids=lambda c: c.__name__)
@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_padded_batch_equals_one_by_one(cls, side):
    model = encoder(cls)
    lengths = [13, 6, 9]
    T = max(lengths)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 259, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask, glob = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
        glob[i, sl.start] = 1  # the first real token, and one in the middle
        glob[i, sl.start + 3] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, global_attention_mask=glob)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            alone = model(s[None], global_attention_mask=glob[i : i + 1, sl])
            if cls is ZooLongformerForSequenceClassification:
                continue  # pools position 0, a padding token when padded on the left
            torch.testing.assert_close(
                _main_output(batched)[i, sl], _main_output(alone)[0], rtol=1e-4, atol=1e-5
            )
    if cls is ZooLongformerForSequenceClassification and side == "right":
        with torch.no_grad():
            alone = torch.cat([model(s[None]).logits for s in seqs])
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, alone, rtol=1e-4, atol=1e-5)


def test_lora_adapter_trains_the_masked_lm():
    from peft import LoraConfig, get_peft_model

    from zoo.models import default_lora_targets

    model = encoder(ZooLongformerForMaskedLM).train()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=default_lora_targets(model))
    )
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n, _ in peft_model.named_parameters() if "lora_" in n
    }
    assert any("q_global_proj.lora_" in n for n, _ in peft_model.named_parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (4, 16), generator=g)
    labels = ids.clone()
    masked = torch.rand(ids.shape, generator=g) < 0.3
    labels[~masked] = -100
    inputs = ids.masked_fill(masked, 2)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = peft_model(input_ids=inputs, labels=labels, global_attention_mask=_glob(ids)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def roberta_causal(window: int, T: int):
    """transformers' ``RobertaForCausalLM`` (post-norm decoder, RoBERTa's LM head) away from initialisation, the
    zoo causal Longformer with its weights, and the 4-D mask that gives RoBERTa the causal window: query i sees
    keys i - window ... i."""
    sizes = {k: v for k, v in SIZES.items() if k != "attention_window"}
    sizes["type_vocab_size"] = 1
    torch.manual_seed(0)
    hf = RobertaForCausalLM(RobertaConfig(**sizes, is_decoder=True, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = ZooLongformerForCausalLM(ZooLongformerConfig(**sizes, attention_window=window)).eval()
    # the names are RoBERTa's inside Longformer's checkpoints: the converter's renaming maps them
    state = {_to_zoo_name(n.replace("roberta.", "longformer.", 1)): t for n, t in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    pos = torch.arange(T)
    d = pos[:, None] - pos[None, :]
    mask = torch.zeros(1, 1, T, T).masked_fill(~((d >= 0) & (d <= window)), torch.finfo(torch.float32).min)
    return hf, ours, mask


@pytest.mark.parametrize("window, T", [(4, 23), (8, 23), (32, 23)])
def test_causal_lm_equals_roberta_for_causal_lm(window, T):
    """The whole causal model, LM head included (dense, activation, LayerNorm, tied decoder with a bias, as
    RoBERTa's): with only a bare tied projection after the last post-norm layer, training collapsed every token
    onto one direction and stopped at the unigram entropy."""
    hf, ours, mask = roberta_causal(window, T)
    ids = torch.randint(3, SIZES["vocab_size"], (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask.expand(2, 1, T, T)).logits
        got = ours(ids).logits
        got_packed = ours(
            ids.reshape(1, 2 * T), position_ids=torch.arange(T).repeat(2)[None]
        ).logits  # the two rows packed as two documents
    assert rel_err(got, expected) < 1e-5
    assert rel_err(got_packed.reshape(2, T, -1), expected) < 1e-5
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight


def test_causal_cache_holds_only_the_window():
    model = AutoModelForCausalLM.from_config(tiny_config("zoo_longformer")).eval()
    assert isinstance(model, ZooLongformerForCausalLM) and model.config.causal
    ids = torch.randint(3, 259, (2, 6))
    out = model.generate(
        ids, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    cache = output_cache(out) if hasattr(out, "cache") else out.past_key_values
    assert cache.get_seq_length() == 6 + 12 - 1
    windows = model.config.attention_window
    assert [layer.keys.shape[2] for layer in cache.layers] == windows


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="attention_window"):
        ZooLongformerConfig(num_hidden_layers=2, attention_window=[4, 5])
    with pytest.raises(ValueError, match="attention_window"):
        ZooLongformerConfig(num_hidden_layers=2, attention_window=[4, 4, 4])
    causal = AutoModelForCausalLM.from_config(tiny_config("zoo_longformer"))
    ids = torch.randint(3, 259, (1, 8))
    with pytest.raises(ValueError, match="global_attention_mask"):
        causal.model(ids, global_attention_mask=torch.ones_like(ids))
    model = encoder(ZooLongformerForMaskedLM)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(3, 259, (1, 130)))
    with pytest.raises(ValueError, match="no cache"):
        model.model(ids, use_cache=True)
