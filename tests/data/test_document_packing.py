import random

import pytest
import torch

from zoo.data import (
    IGNORE_INDEX,
    DataCollatorForPacked,
    cu_seqlens_from_position_ids,
    default_tokenizer,
    document_mask_from_position_ids,
    make_packed_dataset,
    pack_documents,
    synthetic_dataset,
)

EOS, BOS = 1, 2


def test_hand_made_example():
    out = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]], block_size=4, eos_token_id=EOS)
    assert out["input_ids"] == [[5, 6, 7, 1], [8, 9, 1, 10], [11, 12, 13, 14], [1, 1, 1, 1]]
    assert out["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 1, 2]]
    assert out["labels"] == [
        [-100, 6, 7, 1],
        [-100, 9, 1, -100],
        [-100, 12, 13, 14],
        [-100, -100, -100, -100],
    ]
    dropped = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]], 4, EOS, drop_last=True)
    assert dropped["input_ids"] == out["input_ids"][:3]


@pytest.mark.parametrize("block_size", [1, 3, 7, 16])
@pytest.mark.parametrize("bos", [None, BOS])
def test_every_token_kept_in_order(block_size, bos):
    rng = random.Random(block_size)
    docs = [[rng.randrange(3, 100) for _ in range(rng.randrange(0, 20))] for _ in range(30)]
    out = pack_documents(docs, block_size, EOS, bos, pad_token_id=0)
    assert all(len(row) == block_size for key in out for row in out[key])
    stream = [t for row in out["input_ids"] for t in row]
    expected = [t for d in docs if d for t in ([bos] if bos is not None else []) + d + [EOS]]
    assert stream[: len(expected)] == expected
    assert all(t == 0 for t in stream[len(expected) :])
    for b, (ids, pos, labels) in enumerate(zip(out["input_ids"], out["position_ids"], out["labels"])):
        assert pos[0] == 0
        for i in range(1, block_size):
            assert pos[i] in (0, pos[i - 1] + 1)
        for i, (t, p, label) in enumerate(zip(ids, pos, labels)):
            padding = b * block_size + i >= len(expected)
            assert label == (IGNORE_INDEX if p == 0 or padding else t)


def test_position_restarts_mark_documents():
    docs = [[10] * 5, [20] * 2, [30] * 8]
    out = pack_documents(docs, 6, EOS)
    assert len(out["input_ids"]) == 3
    pos = [p for row in out["position_ids"] for p in row]
    ids = [t for row in out["input_ids"] for t in row]
    # Documents start at stream offsets 0, 6 and 9; the third continues into the block at 12 and restarts there.
    assert [i for i, p in enumerate(pos) if p == 0] == [0, 6, 9, 12]
    assert pos[9:18] == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert ids[5] == ids[8] == ids[17] == EOS


def test_cu_seqlens_and_document_mask():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    cu = cu_seqlens_from_position_ids(position_ids)
    assert cu.dtype == torch.long
    assert cu.tolist() == [0, 3, 5, 7, 10]
    # A row that does not begin at position 0 still starts a new document.
    assert cu_seqlens_from_position_ids(torch.tensor([[3, 4, 0, 1]])).tolist() == [0, 2, 4]

    mask = document_mask_from_position_ids(position_ids)
    assert mask.shape == (2, 5, 5) and mask.dtype == torch.bool
    doc = [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    for b in range(2):
        for i in range(5):
            for j in range(5):
                assert mask[b, i, j].item() == (doc[b][i] == doc[b][j] and j <= i)


def test_make_packed_dataset_and_collator():
    tok = default_tokenizer()
    ds = synthetic_dataset("copy", 40, seed=0)
    packed = make_packed_dataset(ds, tok, block_size=32)
    assert set(packed.column_names) == {"input_ids", "position_ids", "labels"}
    stream = [t for row in packed["input_ids"] for t in row]
    expected = [t for text in ds["text"] for t in tok(text, add_special_tokens=False)["input_ids"] + [EOS]]
    assert stream[: len(expected)] == expected
    assert all(t == tok.pad_token_id for t in stream[len(expected) :])

    batch = DataCollatorForPacked()([packed[i] for i in range(4)])
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert all(v.shape == (4, 32) and v.dtype == torch.long for v in batch.values())
    assert ((batch["position_ids"] == 0) == (batch["labels"] == IGNORE_INDEX)).all()
    assert cu_seqlens_from_position_ids(batch["position_ids"])[-1].item() == 4 * 32

    with pytest.raises(ValueError, match="text_column"):
        make_packed_dataset(ds, tok, 32, text_column="content")


def test_one_document_per_block_with_attention_mask():
    docs = [[5, 6], [7, 8, 9, 10, 11, 12], [13]]
    out = pack_documents(docs, 4, EOS, pad_token_id=0, one_per_block=True, attention_mask=True)
    # Each document starts a block; the rest of the block before is padding (labels -100, attention 0, positions
    # going on from the document's); a document longer than a block continues in the next one.
    assert out["input_ids"] == [[5, 6, 1, 0], [7, 8, 9, 10], [11, 12, 1, 0], [13, 1, 0, 0]]
    assert out["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert out["labels"] == [
        [-100, 6, 1, -100],
        [-100, 8, 9, 10],
        [-100, 12, 1, -100],
        [-100, 1, -100, -100],
    ]
    assert out["attention_mask"] == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    # Without the options: the packing every existing run uses, and no attention_mask row.
    plain = pack_documents(docs, 4, EOS, pad_token_id=0)
    assert "attention_mask" not in plain and plain["input_ids"][0] == [5, 6, 1, 7]
    masked = pack_documents(docs, 4, EOS, pad_token_id=0, attention_mask=True)
    assert masked["input_ids"] == plain["input_ids"] and masked["attention_mask"][:-1] == [[1] * 4] * 2
