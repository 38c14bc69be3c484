"""zoo's BigBird question answering against transformers' ``BigBirdForQuestionAnswering`` (Zaheer et al. 2020,
arXiv:2007.14062) on the same weights: converted with ``python -m zoo.convert``, loaded back through
``AutoModelForQuestionAnswering``, equal start/end logits and loss in eval mode with padding, block-sparse (at
padding positions too: with ``transformers_compat``, padding queries get zero attention output, as in
transformers). Back again through ``python -m zoo.convert``: transformers' class with the same weights and the same
logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, BigBirdForQuestionAnswering

import zoo  # noqa: F401  (registers zoo's architectures with the Auto classes)
from tests.models.test_bigbird import SPARSE_FROM, hf_config, ids_and_mask
from tests.ops.harness import rel_err
from zoo.convert import convert
from zoo.models.bigbird import ZooBigBirdForCausalLM, ZooBigBirdForQuestionAnswering
from zoo.models.bigbird.convert_bigbird import to_transformers

SEP = 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(4)
    hf = BigBirdForQuestionAnswering(hf_config()).eval()
    src, dst = tmp_path_factory.mktemp("hf_qa"), tmp_path_factory.mktemp("zoo_qa")
    hf.save_pretrained(src)
    convert(src, dst)
    return hf, AutoModelForQuestionAnswering.from_pretrained(dst).eval()


def qa_inputs(T, pad, question):
    """``<cls> question <sep> context`` rows, right padding: the first <sep> at ``question[b]``."""
    ids, mask = ids_and_mask(T, pad=pad, seed=T)
    for b, n in enumerate(question):
        ids[b, 0], ids[b, n] = 2, SEP
    return ids, mask


def test_auto_class_loads_zoo(converted):
    _, zoo_model = converted
    assert type(zoo_model) is ZooBigBirdForQuestionAnswering
    assert zoo_model.config.model_type == "zoo_bigbird"


@pytest.mark.parametrize("T", [SPARSE_FROM + 9, 58])
def test_logits_and_loss_equal_transformers(converted, T):
    hf, zoo_model = converted
    ids, mask = qa_inputs(T, pad=(0, 9), question=(6, 11))
    start, end = torch.tensor([20, 15]), torch.tensor([24, 30])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, start_positions=start, end_positions=end)
        out = zoo_model(ids, attention_mask=mask, start_positions=start, end_positions=end)
    real = mask.bool()
    for name in ("start_logits", "end_logits"):
        a, b = getattr(out, name), getattr(ref, name)
        # every logit but the question's (lowered by 1e6 in both), padding included: the loss normalises over them
        context = b > -1e5
        assert rel_err(a[context], b[context]) < 1e-5, name
        assert torch.equal(a[real] < -1e5, b[real] < -1e5), f"{name}: the question is masked elsewhere"
    assert rel_err(out.loss, ref.loss) < 1e-5
    # the pattern is sparse at this length: full attention gives other logits
    full = BigBirdForQuestionAnswering(hf_config("original_full")).eval()
    full.load_state_dict(hf.state_dict())
    with torch.no_grad():
        dense = full(ids, attention_mask=mask).start_logits
    assert rel_err(dense[context], ref.start_logits[context]) > 1e-3


def test_explicit_question_lengths_and_token_types(converted):
    hf, zoo_model = converted
    ids, mask = qa_inputs(50, pad=(4, 0), question=(5, 8))
    lengths = torch.tensor([[3], [12]])
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(0))
    for kwargs in (dict(question_lengths=lengths), dict(question_lengths=lengths, token_type_ids=types)):
        with torch.no_grad():
            ref = hf(ids, attention_mask=mask, **kwargs).end_logits
            out = zoo_model(ids, attention_mask=mask, **kwargs).end_logits
        ok = ref > -1e5
        assert rel_err(out[ok], ref[ok]) < 1e-5
        assert torch.equal(out < -1e5, ref < -1e5)


def test_back_to_transformers(converted, tmp_path):
    """zoo -> transformers through ``python -m zoo.convert``: the folder's head gives ``BigBirdForQuestionAnswering``
    with transformers' weights, and the same start/end logits as the original and as zoo, block-sparse."""
    hf, zoo_model = converted
    zoo_model.save_pretrained(tmp_path / "zoo")
    convert(tmp_path / "zoo", tmp_path / "back")
    back = BigBirdForQuestionAnswering.from_pretrained(tmp_path / "back").eval()
    assert back.config.sep_token_id == hf.config.sep_token_id == SEP
    assert back.config.num_labels == 2 and back.bert.pooler is None  # transformers' QA model has no pooler
    original = hf.state_dict()
    assert back.state_dict().keys() == original.keys()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    T = 58
    assert T > SPARSE_FROM  # transformers keeps its block-sparse path at this length
    ids, mask = qa_inputs(T, pad=(0, 9), question=(6, 11))
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask)
        again = back(ids, attention_mask=mask)
        ours = zoo_model(ids, attention_mask=mask)
    assert back.bert.attention_type == "block_sparse"
    for name in ("start_logits", "end_logits"):
        a, b, z = getattr(again, name), getattr(ref, name), getattr(ours, name)
        context = b > -1e5  # the question's logits are lowered by 1e6 in all three
        assert torch.equal(a < -1e5, b < -1e5) and torch.equal(z < -1e5, b < -1e5), name
        assert rel_err(a[context], b[context]) < 1e-5, name
        assert rel_err(z[context], a[context]) < 1e-5, name
    with pytest.raises(ValueError, match="no transformers counterpart"):
        to_transformers(ZooBigBirdForCausalLM(zoo_model.config))
