"""Training data: sources, the packed cache, the step-indexed sampler, and packed = separate documents."""

import json

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import zoo
from tests.models.tiny_configs import tiny_config
from zoo.data.tokenizer import default_tokenizer
from zoo.training.data import BlockSampler, eval_batches, get_batch, load_text_splits, packed_dataset
from zoo.training.recipe import DataConfig, RecipeError

DOCS = [f"document number {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(40)]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS))
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS))
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "docs.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:02d}.txt").write_text(doc)
    return tmp_path


@pytest.mark.parametrize(
    "name, options",
    [
        ("docs.txt", {"sample_by": "paragraph"}),
        ("docs.jsonl", {"text_column": "body"}),
        ("docs.parquet", {}),
        ("folder", {"sample_by": "document"}),
    ],
)
def test_local_sources(files, name, options):
    cfg = DataConfig(train=str(files / name), validation_fraction=0.1, **options)
    train, validation = load_text_splits(cfg, seed=0)
    column = options.get("text_column", "text")
    assert sorted(list(train[column]) + list(validation[column])) == sorted(DOCS)
    assert len(validation) == 4


def test_synthetic_source_and_column_errors(files):
    train, validation = load_text_splits(DataConfig(train="synthetic:copy", synthetic={"n": 30}), seed=0)
    assert len(train) == 30 and len(validation) >= 1
    with pytest.raises(RecipeError, match="data.text_column: 'text' is not a column"):
        load_text_splits(DataConfig(train=str(files / "docs.jsonl")), seed=0)


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RecipeError, match="data.train: could not load Hub dataset 'someone/nothing-here'"):
        load_text_splits(DataConfig(train="someone/nothing-here"), seed=0)
    # A missing local folder is not a failed download.
    with pytest.raises(RecipeError, match="data.train: no such file or folder 'no/such/folder'"):
        load_text_splits(DataConfig(train="no/such/folder"), seed=0)


def test_packed_dataset_is_cached(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    text = datasets.Dataset.from_dict({"text": DOCS})
    first = packed_dataset(text, default_tokenizer(), 64, cfg, "train")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = packed_dataset(text, default_tokenizer(), 64, cfg, "train")
    assert list(again["input_ids"]) == list(first["input_ids"]) and again.cache_files == first.cache_files
    packed_dataset(text, default_tokenizer(), 32, cfg, "train")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_sampler_is_a_function_of_the_step():
    one = BlockSampler(num_rows=37, batch_size=3, grad_accum=2, num_processes=1, seed=5)
    two = BlockSampler(num_rows=37, batch_size=3, grad_accum=1, num_processes=2, seed=5)
    for step in range(30):
        # One process with grad_accum 2 reads what two processes read together, in the same order.
        assert one.indices(step, 0, 0) + one.indices(step, 1, 0) == two.indices(step, 0, 0) + two.indices(
            step, 0, 1
        )
    # Each epoch visits every row once; a fresh sampler (a resumed run) gives the same order.
    seen = [i for step in range(37) for micro in range(2) for i in one.indices(step, micro, 0)]
    assert sorted(seen[:37]) == list(range(37)) and sorted(seen[37:74]) == list(range(37))
    assert seen[:37] != seen[37:74]
    fresh = BlockSampler(37, 3, 2, 1, seed=5)
    assert fresh.indices(20, 1, 0) == one.indices(20, 1, 0)
    assert BlockSampler(37, 3, 2, 1, seed=6).indices(0, 0, 0) != one.indices(0, 0, 0)


def test_eval_batches_split_evenly():
    per_rank = [list(eval_batches(10, 3, 0, 2, rank)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert per_rank[0][0] == [0, 1, 2] and per_rank[1][0] == [3, 4, 5]
    assert len(list(eval_batches(10, 3, 1, 1, 0))) == 1


@pytest.mark.parametrize("model_type", sorted(zoo.REGISTRY))
def test_packed_batch_equals_documents_alone(model_type, tmp_path):
    """Through the trainer's data path (packed_dataset, get_batch) and its loss: every architecture reads a packed
    block as its documents alone, in logits, loss and gradients."""
    torch.manual_seed(0)
    # eval(): no dropout, so that packed and separate forwards are the same function.
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    tokenizer = default_tokenizer()
    texts = ["the cat sat", "on a mat and purred", "dogs bark", "a much longer document " * 3, "end"]
    text = datasets.Dataset.from_dict({"text": texts})
    packed = packed_dataset(text, tokenizer, 48, DataConfig(cache_dir=str(tmp_path / "cache")), "train")
    batch = get_batch(packed, list(range(len(packed))), torch.device("cpu"))
    assert batch["input_ids"].shape[0] >= 2
    out = model(**batch)
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    loss_sum, n_tokens, checked = 0.0, 0, 0
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        for a, b in zip(starts, starts[1:] + [batch["input_ids"].shape[1]]):
            ids, labels = batch["input_ids"][row, a:b], batch["labels"][row, a:b]
            assert labels[0] == -100
            alone = model(input_ids=ids[None]).logits[0]
            torch.testing.assert_close(out.logits[row, a:b], alone, atol=1e-5, rtol=1e-4)
            targets = labels[1:]
            if (targets != -100).any():
                loss_sum = loss_sum + F.cross_entropy(alone[:-1], targets, reduction="sum")
                n_tokens += int((targets != -100).sum())
                checked += 1
    assert checked >= 4
    # The packed loss is the token-weighted mean of the documents' losses, and so are its gradients.
    separate = loss_sum / n_tokens
    torch.testing.assert_close(out.loss, separate, atol=1e-5, rtol=1e-5)
    separate.backward()
    assert packed_grads and packed_grads.keys() == {
        n for n, p in model.named_parameters() if p.grad is not None
    }
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(
                packed_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )
