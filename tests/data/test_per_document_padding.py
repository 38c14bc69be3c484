"""Blocks of ``data.packing: per_document`` are right-padded sequences, not packed rows: they carry an
``attention_mask`` (0 on padding) and the padding's positions go on from the document's instead of restarting at 0.

Before, the padding restarted at 0 and every model that reads restarts as document boundaries took it for a second
packed document: RMT ran each row alone, the recurrent models flattened the batch into packed documents. Here every
model gets one document per row, gives on each row's real tokens what the document gives alone, and the same loss
as on the restarting blocks; the padding changes no loss and no gradient; the trainer's data path carries the mask;
``packing: concat`` keeps its restarting positions and no mask.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo  # noqa: F401
from tests.models.tiny_configs import TINY, tiny_config
from zoo.data import IGNORE_INDEX, DataCollatorForPacked, default_tokenizer, pack_documents
from zoo.models.rmt.modeling_rmt import RMTModel
from zoo.modules.documents import PackedDocuments, has_several_documents
from zoo.training.data import get_batch, load_text_splits, packed_dataset
from zoo.training.mlm import Masker, ensure_mask_token
from zoo.training.recipe import DataConfig

EOS, PAD = 1, 0
ARCHS = sorted(TINY)


def random_docs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


def per_document_batch(lengths, block_size, seed=0):
    out = pack_documents(random_docs(lengths, seed), block_size, EOS, pad_token_id=PAD, one_per_block=True)
    rows = [{key: column[i] for key, column in out.items()} for i in range(len(out["input_ids"]))]
    return DataCollatorForPacked()(rows)


def restarting(batch):
    """The same blocks as per-document packing wrote them before: no mask, and the padding's positions
    restarting at 0 (a document of its own)."""
    mask = batch["attention_mask"]
    columns = torch.arange(mask.shape[1])[None]
    padding_positions = columns - mask.sum(-1, keepdim=True)
    return {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": torch.where(mask.bool(), batch["position_ids"], padding_positions),
    }


def test_per_document_blocks_are_padded_sequences():
    docs = [[5, 6], [7, 8, 9, 10, 11, 12], [13]]
    out = pack_documents(docs, 4, EOS, pad_token_id=PAD, one_per_block=True)
    assert out["input_ids"] == [[5, 6, 1, 0], [7, 8, 9, 10], [11, 12, 1, 0], [13, 1, 0, 0]]
    assert out["position_ids"] == [[0, 1, 2, 3]] * 4
    assert out["attention_mask"] == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert out["labels"] == [[-100, 6, 1, -100], [-100, 8, 9, 10], [-100, 12, 1, -100], [-100, 1, -100, -100]]
    # asking for the mask changes nothing
    assert pack_documents(docs, 4, EOS, pad_token_id=PAD, one_per_block=True, attention_mask=True) == out

    # with a bos token and a loss on part of each document, over random lengths: one document start per block
    # (its first column), the mask is 1 exactly on the real tokens, and padding is never a target
    docs = random_docs([3, 11, 1, 5, 12, 2], seed=1)
    masks = [[(i + 1) % 2 for i in range(len(d))] for d in docs]  # a target in every block: none is dropped
    out = pack_documents(docs, 8, EOS, 2, pad_token_id=PAD, one_per_block=True, loss_masks=masks)
    batch = DataCollatorForPacked()([{k: v[i] for k, v in out.items()} for i in range(len(out["input_ids"]))])
    assert not has_several_documents(batch["position_ids"])
    assert (batch["position_ids"] == torch.arange(8)).all()
    real = batch["attention_mask"].bool()
    assert (real == (real.long().cumsum(-1) == torch.arange(1, 9))).all()  # ones, then zeros
    assert (batch["labels"][~real] == IGNORE_INDEX).all() and (batch["input_ids"][~real] == PAD).all()
    stream = [
        t for row, keep in zip(batch["input_ids"].tolist(), real.tolist()) for t, k in zip(row, keep) if k
    ]
    assert stream == [t for d in docs for t in [2, *d, EOS]]


def test_concat_packing_is_unchanged():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    for attention_mask in (False, True):
        out = pack_documents(docs, 4, EOS, attention_mask=attention_mask)
        # the last block's padding is still a document of its own, and there is a mask only when asked for
        assert out["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 1, 2]]
        assert ("attention_mask" in out) == attention_mask


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rmt_runs_a_per_document_batch_whole(mode, monkeypatch):
    """RMT used to run every row of a per-document batch alone (its padding read as a second document); now it
    runs the batch through its backbone whole, with the same loss and gradients."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("zoo_rmt")).train(mode == "train")
    batch = per_document_batch([9, 4, 14], 20)  # three segments of 8 tokens
    rows = []
    model.model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )

    def loss_and_grads(inputs):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        if mode == "eval":
            return loss, []
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    old_loss, old_grads = loss_and_grads(restarting(batch))
    assert rows and set(rows) == {1}  # one row at a time

    def packed_documents(*args):
        raise AssertionError("RMT took a per-document batch for packed documents")

    monkeypatch.setattr(RMTModel, "_documents", packed_documents)
    rows.clear()
    new_loss, new_grads = loss_and_grads(batch)
    assert rows and set(rows) == {3}  # the whole batch at every backbone call
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-5, atol=1e-6)
    for new, old in zip(new_grads, old_grads, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_model_reads_one_document_per_row(model_type, monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).train()
    batch = per_document_batch([9, 4, 6], 12, seed=2)
    real = batch["attention_mask"].bool()
    flattened = []
    make_documents = PackedDocuments.from_position_ids.__func__

    def spy(cls, position_ids):
        flattened.append(position_ids)
        return make_documents(cls, position_ids)

    monkeypatch.setattr(PackedDocuments, "from_position_ids", classmethod(spy))
    out = model(**batch)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert not flattened, "a model flattened the per-document rows into packed documents"

    # the padding is no input: other ids there change neither the loss nor any gradient
    model.zero_grad(set_to_none=True)
    noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(~real, 7))
    noisy_out = model(**noisy)
    noisy_out.loss.backward()
    torch.testing.assert_close(noisy_out.loss, out.loss, rtol=1e-5, atol=1e-6)
    noisy_grads = [p.grad for p in model.parameters() if p.grad is not None]
    for got, expected in zip(noisy_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        # a row's real tokens give what its document gives alone (the row with the most padding)
        n = int(real[1].sum())
        alone = model(batch["input_ids"][1:2, :n], use_cache=False).logits[0]
        torch.testing.assert_close(out.logits[1, :n], alone, rtol=1e-4, atol=1e-5)
        # the loss equals the restarting blocks', training and evaluating (with the cache on by default)
        torch.testing.assert_close(model(**restarting(batch)).loss, out.loss, rtol=1e-5, atol=1e-6)
        model.eval()
        torch.testing.assert_close(model(**batch).loss, model(**restarting(batch)).loss, rtol=1e-5, atol=1e-6)


def _passkey_config(tmp_path, packing):
    return DataConfig(
        train="synthetic:passkey",
        synthetic={"n": 8, "n_validation": 2, "min_len": 40, "max_len": 60},
        packing=packing,
        cache_dir=str(tmp_path / "cache"),
    )


def test_trainer_batches_carry_the_mask(tmp_path):
    tokenizer = default_tokenizer()
    cfg = _passkey_config(tmp_path, "per_document")
    text, _ = load_text_splits(cfg, seed=0)
    data = packed_dataset(text, tokenizer, 96, cfg, "train")
    assert "attention_mask" in data.column_names and len(data) == len(text)
    batch = get_batch(data, [0, 1, 2], "cpu")
    assert set(batch) == {"input_ids", "position_ids", "labels", "attention_mask"}
    assert not has_several_documents(batch["position_ids"])
    # the loss's targets and the tokens counted for throughput (every column of the block) are as before
    real = batch["attention_mask"].bool()
    assert batch["input_ids"].numel() == 3 * 96
    assert ((batch["labels"] != IGNORE_INDEX) == (real & (batch["position_ids"] > 0))).all()

    # the MLM objective reads the same mask (it asked for one already) and never picks padding
    mlm = packed_dataset(text, tokenizer, 96, cfg, "validation", attention_mask=True)
    assert mlm[:] == data[:]
    with_mask_token = default_tokenizer()
    ensure_mask_token(with_mask_token)
    masked = Masker(with_mask_token, 0.5)(batch, seed=0)
    assert torch.equal(masked["attention_mask"], batch["attention_mask"])
    assert (masked["labels"][~real] == IGNORE_INDEX).all() and (masked["labels"][real] != IGNORE_INDEX).any()

    concat = packed_dataset(text, tokenizer, 96, _passkey_config(tmp_path, "concat"), "train")
    assert "attention_mask" not in concat.column_names


def test_randomized_positions_of_per_document_blocks():
    """``training.randomized_positions`` draws each document's positions for its own tokens, as it did when the
    padding restarted at 0 (the same draw), and the padding goes on from them without restarting."""
    from zoo.training.loop import randomized_batch_positions

    batch = per_document_batch([9, 4, 14], 20)
    real = batch["attention_mask"].bool()
    drawn = randomized_batch_positions(batch["position_ids"], 64, 0, 3, 0, 0, batch["attention_mask"])
    before = randomized_batch_positions(restarting(batch)["position_ids"], 64, 0, 3, 0, 0)
    assert torch.equal(drawn[real], before[real])
    assert (drawn[:, 0] == 0).all() and (drawn[:, 1:] > 0).all() and drawn.max() < 64
    # increasing over the real tokens; the padding's positions stop at the last one there is
    assert (drawn.diff(dim=-1) >= 0).all() and (drawn.diff(dim=-1)[real[:, 1:]] > 0).all()
