"""zoo's BigBird against transformers' (Zaheer et al. 2020, arXiv:2007.14062): a tiny ``BigBirdConfig`` built here,
weights converted with ``python -m zoo.convert``, equal logits in eval mode for ``block_sparse`` (long enough to be
sparse, not a multiple of the block size, right padding) and ``original_full``, and transformers' switch to full
attention for short inputs. Then zoo's own defaults: the seeded plan, padding invariance, the causal variant against
the dense oracle of its pattern."""

from __future__ import annotations

import pytest
import torch
from transformers import BigBirdConfig, BigBirdForMaskedLM, BigBirdForSequenceClassification

from tests.ops.harness import rel_err
from zoo.convert import convert
from zoo.models.bigbird import ZooBigBirdConfig, ZooBigBirdForCausalLM, ZooBigBirdForMaskedLM
from zoo.models.bigbird.convert_bigbird import from_transformers, to_transformers
from zoo.ops.sparse_attention import SparsePattern, sparse_attention

BLOCK, RANDOM = 4, 2
SPARSE_FROM = (5 + 2 * RANDOM) * BLOCK  # transformers runs block_sparse above this length


def hf_config(attention_type="block_sparse", **overrides):
    return BigBirdConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        block_size=BLOCK,
        num_random_blocks=RANDOM,
        attention_type=attention_type,
        sep_token_id=3,
        **overrides,
    )


def ids_and_mask(T, pad=(0, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 97, (len(pad), T), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(pad):
        if n:
            ids[b, T - n :], mask[b, T - n :] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """transformers' BigBirdForMaskedLM (block_sparse) and its conversion through ``python -m zoo.convert``."""
    torch.manual_seed(0)
    hf = BigBirdForMaskedLM(hf_config()).eval()
    src, dst = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("zoo")
    hf.save_pretrained(src)
    convert(src, dst)
    zoo_model = ZooBigBirdForMaskedLM.from_pretrained(dst).eval()
    return hf, zoo_model


def hf_logits(hf, attention_type, ids, mask):
    """transformers' logits with a given attention type, on a copy (its switch to full attention changes the
    model object it runs on)."""
    model = BigBirdForMaskedLM(hf_config(attention_type)).eval()
    model.load_state_dict(hf.state_dict())
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("T", [SPARSE_FROM + 1, 58, 64])  # 37 and 58: not multiples of the block size
def test_block_sparse_logits_equal_transformers(converted, T):
    hf, zoo_model = converted
    ids, mask = ids_and_mask(T)
    ref = hf_logits(hf, "block_sparse", ids, mask)
    with torch.no_grad():
        out = zoo_model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(out[real], ref[real]) < 1e-5
    # the pattern matters: full attention gives other logits at this length
    assert rel_err(hf_logits(hf, "original_full", ids, mask)[real], ref[real]) > 1e-3


@pytest.mark.parametrize("T", [SPARSE_FROM, 50])
def test_original_full_logits_equal_transformers(converted, T):
    """``original_full``, and transformers' switch to full attention at T <= (5 + 2r) * block_size."""
    hf, zoo_model = converted
    ids, mask = ids_and_mask(T, pad=(0, 7))
    full = ZooBigBirdForMaskedLM(
        ZooBigBirdConfig(**{**zoo_model.config.to_diff_dict(), "attention_type": "original_full"})
    )
    full.load_state_dict(zoo_model.state_dict())
    with torch.no_grad():
        out_full = full.eval()(ids, attention_mask=mask).logits
        out_switch = zoo_model(ids, attention_mask=mask).logits
    real = mask.bool()
    ref = hf_logits(hf, "original_full", ids, mask)
    assert rel_err(out_full[real], ref[real]) < 1e-5
    if T <= SPARSE_FROM:
        assert rel_err(out_switch[real], hf_logits(hf, "block_sparse", ids, mask)[real]) < 1e-5
    assert zoo_model.config.attention_type == "block_sparse"  # no side effect on the model


def test_sequence_classification_equals_transformers():
    torch.manual_seed(1)
    hf = BigBirdForSequenceClassification(hf_config(num_labels=3)).eval()
    zoo_model = from_transformers(hf).eval()
    ids, mask = ids_and_mask(45, pad=(0, 5))
    with torch.no_grad():
        ref = BigBirdForSequenceClassification(hf_config(num_labels=3)).eval()
        ref.load_state_dict(hf.state_dict())
        assert (
            rel_err(zoo_model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits) < 1e-5
        )


def test_sequence_classification_back_to_transformers():
    """zoo -> transformers for the classifier: ``BigBirdForSequenceClassification`` with the same labels and weights
    (the unused pooler aside, which zoo does not keep) and the same logits, block-sparse."""
    torch.manual_seed(5)
    hf = BigBirdForSequenceClassification(hf_config(id2label={0: "a", 1: "b", 2: "c"})).eval()
    back = to_transformers(from_transformers(hf)).eval()
    assert type(back) is BigBirdForSequenceClassification and back.config.id2label == hf.config.id2label
    for name, tensor in hf.state_dict().items():
        if not name.startswith("bert.pooler."):
            assert torch.equal(back.state_dict()[name], tensor), name
    ids, mask = ids_and_mask(45, pad=(0, 5))
    assert ids.shape[1] > SPARSE_FROM
    with torch.no_grad():
        assert rel_err(back(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) < 1e-5
    assert back.bert.attention_type == "block_sparse"


def test_back_to_transformers(converted):
    hf, zoo_model = converted
    back = to_transformers(zoo_model).eval()
    ids, mask = ids_and_mask(50)
    real = mask.bool()
    assert (
        rel_err(
            hf_logits(back, "block_sparse", ids, mask)[real], hf_logits(hf, "block_sparse", ids, mask)[real]
        )
        < 1e-6
    )


def zoo_config(**overrides):
    return ZooBigBirdConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, block_size=BLOCK, num_random_blocks=RANDOM, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("side", ["left", "right"])
def test_zoo_default_padding_changes_nothing(side):
    """Off transformers_compat, the layout starts at each sequence's first real token: a padded row equals the
    sequence alone, in the masked and the causal model."""
    torch.manual_seed(2)
    for cls in (ZooBigBirdForMaskedLM, ZooBigBirdForCausalLM):
        model = cls(zoo_config()).eval()
        ids, _ = ids_and_mask(50, pad=(0,))
        n = 41
        padded = torch.zeros(1, 50, dtype=torch.long)
        mask = torch.zeros_like(padded)
        sl = slice(50 - n, 50) if side == "left" else slice(0, n)
        padded[0, sl], mask[0, sl] = ids[0, :n], 1
        with torch.no_grad():
            alone = (
                model(ids[:, :n], use_cache=False).logits
                if cls is ZooBigBirdForCausalLM
                else model(ids[:, :n]).logits
            )
            kw = {"use_cache": False} if cls is ZooBigBirdForCausalLM else {}
            got = model(padded, attention_mask=mask, **kw).logits[0, sl]
        assert rel_err(got, alone[0]) < 1e-5


def test_causal_attention_follows_the_dense_pattern():
    """The causal model's first layer against the attention written out with the dense oracle of its pattern."""
    torch.manual_seed(3)
    model = ZooBigBirdForCausalLM(zoo_config()).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 53, 32)
    q, k, v = (p(x).view(2, 53, 4, 8) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    pattern = SparsePattern(
        block_size=BLOCK, window_blocks=3, global_blocks=1, random_blocks=RANDOM, causal=True, seed=0
    )
    expected = attn.o_proj(sparse_attention(q, k, v, pattern, backend="naive").reshape(2, 53, 32))
    plan = model.model._attention_plan(
        type("Inputs", (), dict(pad_mask=None, doc_starts=None, cache=None, past_len=0))(), 53
    )
    with torch.no_grad():
        assert rel_err(attn(x, plan), expected) < 1e-5


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="attention_type"):
        zoo_config(attention_type="sparse")
    with pytest.raises(ValueError, match="window_blocks"):
        zoo_config(window_blocks=2)
