"""Training data: sources, the packed cache, the step-indexed sampler, and packed = separate documents."""

import json

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import zoo  # noqa: F401
from zoo.data.packing import pack_documents
from zoo.data.tokenizer import default_tokenizer
from zoo.training.data import BlockSampler, eval_batches, load_text_splits, packed_dataset
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


def test_packed_batch_equals_documents_alone():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "zoo_transformer",
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = default_tokenizer()
    texts = ["the cat sat", "on a mat and purred", "dogs bark", "a much longer document " * 3, "end"]
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    blocks = pack_documents(docs, block_size=48, eos_token_id=tokenizer.eos_token_id, drop_last=True)
    batch = {k: torch.tensor(v) for k, v in blocks.items()}
    assert batch["input_ids"].shape[0] >= 2
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    checked = 0
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [
            batch["input_ids"].shape[1]
        ]
        for a, b in zip(starts[:-1], starts[1:]):
            ids = batch["input_ids"][row, a:b]
            labels = batch["labels"][row, a:b]
            assert labels[0] == -100
            with torch.no_grad():
                alone = model(input_ids=ids[None], labels=ids[None])
            torch.testing.assert_close(packed_logits[row, a:b], alone.logits[0], atol=1e-5, rtol=1e-5)
            if b - a > 1:
                packed_loss = F.cross_entropy(packed_logits[row, a : b - 1], labels[1:])
                torch.testing.assert_close(packed_loss, alone.loss, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked >= 4
    # And the model's own loss on the packed batch is the token-weighted mean of the documents' losses.
    with torch.no_grad():
        loss = model(**batch).loss
    logits = packed_logits[:, :-1].reshape(-1, packed_logits.shape[-1])
    torch.testing.assert_close(
        loss, F.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1)), atol=1e-5, rtol=1e-5
    )
