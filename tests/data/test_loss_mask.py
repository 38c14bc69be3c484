"""A loss on the answer alone: synthetic tasks mark their answer's characters, packing turns them into labels (-100
elsewhere) through either layout of the documents, the trainer's ``data.loss: answer_only`` asks for it, and a
model trained on such a batch learns from the answer tokens and nothing else."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import zoo  # noqa: F401
from tests.models.tiny_configs import tiny_config
from zoo.data import (
    IGNORE_INDEX,
    DataCollatorForPacked,
    default_tokenizer,
    make_packed_dataset,
    pack_documents,
    synthetic_dataset,
    synthetic_documents,
)
from zoo.data.packing import answer_tokens
from zoo.data.synthetic import answer_span, answer_spans_of
from zoo.training.data import check_curriculum_targets, load_text_splits, packed_dataset
from zoo.training.recipe import DataConfig, RecipeError, TrainingConfig, recipe_from_dict

EOS = 1


@pytest.mark.parametrize(
    "name, options, answer",
    [
        ("copy", {}, lambda d: d.split(" -> ")[1]),
        ("counting", {}, lambda d: d.split(" -> ")[1]),
        ("arithmetic", {}, lambda d: d.split("=")[1]),
        ("associative_recall", {}, lambda d: d.split(" -> ")[1]),
        # the key: five digits, stated once in the story and once after the question
        ("passkey", {"min_len": 64, "max_len": 128}, lambda d: d.split("The pass key is ")[1][:5]),
        ("babi_single_fact", {"min_len": 64, "max_len": 128}, lambda d: d.rsplit("? ", 1)[1]),
    ],
)
def test_answer_span_is_the_answer(name, options, answer):
    for doc in synthetic_documents(name, 20, 3, **options):
        start, end = answer_span(name, doc)
        assert doc[start:end] == answer(doc) and end == len(doc) - (name == "passkey")


def test_markov_has_no_answer():
    with pytest.raises(ValueError, match="no answer"):
        answer_span("markov", "abcabc")
    with pytest.raises(ValueError, match="no answer"):
        synthetic_dataset("markov", 2, answer_spans=True, length=8)


def test_pack_documents_masks_labels_in_both_layouts():
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    masks = [[0, 0, 1, 1], [0, 0, 0], [0, 1, 1, 0, 1]]
    per_doc = pack_documents(docs, 6, EOS, one_per_block=True, loss_masks=masks, pad_token_id=0)
    # the second document has no answer: its block is dropped
    assert per_doc["input_ids"] == [[5, 6, 7, 8, 1, 0], [12, 13, 14, 15, 16, 1]]
    assert per_doc["labels"] == [[-100, -100, 7, 8, -100, -100], [-100, 13, 14, -100, 16, -100]]
    # end to end: the masks follow their tokens across block boundaries; a token at a block start is never a
    # target (as without a mask), and the all-ignored middle block is dropped
    concat = pack_documents(docs, 4, EOS, loss_masks=masks, pad_token_id=0)
    assert concat["input_ids"] == [[5, 6, 7, 8], [1, 12, 13, 14], [15, 16, 1, 0]]
    assert concat["position_ids"] == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 0]]
    assert concat["labels"] == [[-100, -100, 7, 8], [-100, -100, 13, 14], [-100, 16, -100, -100]]
    with pytest.raises(ValueError, match="loss_masks"):
        pack_documents(docs, 4, EOS, loss_masks=masks[:2])
    with pytest.raises(ValueError, match=r"loss_masks\[1\]"):
        pack_documents(docs, 4, EOS, loss_masks=[masks[0], [1], masks[2]])


def test_without_masks_nothing_changes():
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    ones = [[1] * len(d) for d in docs]
    # without eos (which a mask never makes a target), a mask of ones is no mask
    plain = pack_documents(docs, 4, None, pad_token_id=0)
    assert pack_documents(docs, 4, None, pad_token_id=0, loss_masks=ones) == plain


def _decoded_targets(tokenizer, packed):
    rows = []
    for ids, labels in zip(packed["input_ids"], packed["labels"]):
        rows.append(tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]))
    return rows


def test_byte_tokenizer_targets_are_the_answers():
    tokenizer = default_tokenizer()
    ds = synthetic_dataset("babi_single_fact", 12, 0, answer_spans=True, min_len=60, max_len=90)
    packed = make_packed_dataset(ds, tokenizer, 192, one_per_block=True, answer_only=True)
    assert _decoded_targets(tokenizer, packed) == [t.rsplit("? ", 1)[1] for t in ds["text"]]
    # the ids are plain tokenisation's: only the labels change
    plain = make_packed_dataset(ds.select_columns(["text"]), tokenizer, 192, one_per_block=True)
    assert packed["input_ids"] == plain["input_ids"]
    for a, b in zip(packed["labels"], plain["labels"]):
        assert all(lab == IGNORE_INDEX or lab == p for lab, p in zip(a, b))


def test_fast_tokenizer_marks_by_offsets():
    words = sorted(
        {
            w
            for t in synthetic_documents("babi_single_fact", 12, 0, min_len=60, max_len=90)
            for w in t.replace(".", " . ").replace("?", " ? ").split()
        }
    )
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, ".": 3, "?": 4, **{w: i + 5 for i, w in enumerate(words)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )
    ds = synthetic_dataset("babi_single_fact", 12, 0, answer_spans=True, min_len=60, max_len=90)
    packed = make_packed_dataset(ds, tokenizer, 64, one_per_block=True, answer_only=True)
    assert _decoded_targets(tokenizer, packed) == [t.rsplit("? ", 1)[1] for t in ds["text"]]
    plain = make_packed_dataset(ds.select_columns(["text"]), tokenizer, 64, one_per_block=True)
    assert packed["input_ids"] == plain["input_ids"]


def test_bad_spans_and_missing_columns_are_clear_errors():
    tokenizer = default_tokenizer()
    with pytest.raises(ValueError, match="answer_start"):
        make_packed_dataset(datasets.Dataset.from_dict({"text": ["a b"]}), tokenizer, 8, answer_only=True)
    bad = datasets.Dataset.from_dict({"text": ["abc"], "answer_start": [2], "answer_end": [5]})
    with pytest.raises(ValueError, match="answer span 2:5"):
        make_packed_dataset(bad, tokenizer, 8, answer_only=True)


@pytest.mark.parametrize("model_type", ["zoo_transformer", "zoo_rmt"])
def test_masked_positions_contribute_nothing(model_type):
    """The model's loss on a collated answer-only batch is the mean cross-entropy over the answer tokens, computed
    here from its logits; the gradient of that loss w.r.t. the logits of every other position is zero."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    tokenizer = default_tokenizer()
    ds = synthetic_dataset("passkey", 3, 0, answer_spans=True, min_len=30, max_len=40)
    packed = make_packed_dataset(ds, tokenizer, 64, one_per_block=True, answer_only=True)
    batch = DataCollatorForPacked()([packed[i] for i in range(len(packed))])
    labels = batch["labels"]
    assert int((labels != IGNORE_INDEX).sum()) == 3 * 5  # five digits per document
    out = model(**batch)

    target = labels[:, 1:]
    chosen = target != IGNORE_INDEX
    logits = out.logits.detach().double()
    expected = F.cross_entropy(logits[:, :-1][chosen], target[chosen], reduction="mean")
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)

    # the same loss, from the model's loss function over logits that are a leaf here
    leaf = out.logits.detach().clone().requires_grad_()
    loss = model.loss_function(logits=leaf, labels=labels, vocab_size=model.config.vocab_size)
    torch.testing.assert_close(loss, out.loss)
    loss.backward()
    predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
    predicts_answer[:, :-1] = chosen
    assert leaf.grad[~predicts_answer].abs().max() == 0
    assert (leaf.grad[predicts_answer].abs().sum(-1) > 0).all()


def test_trainer_data_path_and_recipe_checks(tmp_path):
    cfg = DataConfig(
        train="synthetic:babi_single_fact",
        synthetic={"n": 16, "n_validation": 4, "min_len": 60, "max_len": 90},
        packing="per_document",
        loss="answer_only",
        cache_dir=str(tmp_path / "cache"),
    )
    tokenizer = default_tokenizer()
    train, _ = load_text_splits(cfg, seed=0)
    packed = packed_dataset(train, tokenizer, 192, cfg, "train")
    assert _decoded_targets(tokenizer, packed) == [t.rsplit("? ", 1)[1] for t in train["text"]]
    # a curriculum stage that cuts the answers off is refused; one that keeps them is fine
    with pytest.raises(RecipeError, match="training.curriculum"):
        check_curriculum_targets(packed, TrainingConfig(block_size=192, curriculum=[[0, 32], [5, 192]]), cfg)
    check_curriculum_targets(packed, TrainingConfig(block_size=192, curriculum=[[0, 160], [5, 192]]), cfg)

    base = {
        "model": {"type": "zoo_transformer"},
        "data": {"train": "synthetic:markov", "loss": "answer_only"},
    }
    with pytest.raises(RecipeError, match="synthetic:markov has no answer"):
        recipe_from_dict(base)
    with pytest.raises(RecipeError, match="data.loss"):
        recipe_from_dict({**base, "data": {"loss": "answers"}})
    with pytest.raises(RecipeError, match="answer_only.*answer_start"):
        packed_dataset(
            datasets.Dataset.from_dict({"text": ["a b c"]}), tokenizer, 8, DataConfig(loss="answer_only"), "t"
        )


def test_babi_drill_marks_every_answer_and_each_is_right():
    """Every question of a drill is answered by the place of the asked person's last move before it (replayed
    here from the sentences), and every answer is a target: the packed labels decode to the answers in order."""
    docs = synthetic_documents("babi_drill", 40, 5, num_facts=[3, 5], other_share=0.5)
    others = 0
    for doc in docs:
        where, last_mover, expected = {}, None, []
        for line in doc.split("\n"):
            if line.startswith("Question: Where is "):
                asked = line.removeprefix("Question: Where is ").removesuffix("?")
                others += asked != last_mover
            elif line.startswith("Answer: "):
                assert line == f"Answer: {where[asked]}"
                expected.append(f" {where[asked]}")
            elif line:
                person, place = line.removesuffix(". ").split(" ")
                assert place != where.get(person)
                where[person], last_mover = place, person
        assert 3 <= len(expected) <= 5
        spans = answer_spans_of("babi_drill", doc)
        assert [doc[s:e] for s, e in spans] == expected
    assert 0.2 < others / sum(doc.count("Question") for doc in docs) < 0.7
    tokenizer = default_tokenizer()
    ds = synthetic_dataset("babi_drill", 6, 1, answer_spans=True)
    packed = make_packed_dataset(ds, tokenizer, 256, one_per_block=True, answer_only=True)
    for text, ids, labels in zip(ds["text"], packed["input_ids"], packed["labels"]):
        answers = [text[s:e] for s, e in answer_spans_of("babi_drill", text)]
        targets = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tokenizer.decode(targets) == "".join(answers)
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[: len(plain)] == plain
    full = synthetic_documents("babi_drill", 3, 2, compact=False)
    assert all(" to the " in doc for doc in full)
    with pytest.raises(ValueError, match="answer_spans_of"):
        answer_span("babi_drill", docs[0])
    for bad in ([3], [4, 2], [0, 2]):
        with pytest.raises(ValueError, match=r"num_facts=\["):
            synthetic_documents("babi_drill", 1, 0, num_facts=bad)
    with pytest.raises(ValueError, match="num_people"):
        synthetic_documents("babi_drill", 1, 0, num_people=9)


def test_several_spans_through_both_tokenizer_kinds():
    """Two answers in one text: the byte tokenizer (pieces) and a fast tokenizer (offsets) mark the same
    characters; overlapping or out-of-order spans are refused."""
    text = "a bb ccc dd e"
    ids, masks = answer_tokens(default_tokenizer(), [text], [[2, 9]], [[4, 11]])
    assert masks[0] == [0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    inner = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "bb": 2, "ccc": 3, "dd": 4, "e": 5}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    ids, masks = answer_tokens(fast, [text], [[2, 9]], [[4, 11]])
    assert ids[0] == [1, 2, 3, 4, 5] and masks[0] == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="answer span 3:5 of document 0 is not .* after the previous span"):
        answer_tokens(default_tokenizer(), [text], [[2, 3]], [[4, 5]])
    with pytest.raises(ValueError, match="equally long lists"):
        answer_tokens(default_tokenizer(), [text], [[2, 9]], [[4]])
