"""Mamba-2 against transformers' ``Mamba2ForCausalLM`` (same weights through ``zoo.convert``): logits, greedy
generation, padded batches, grouped B/C, the conversion back, and the command-line entry point."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Mamba2Config
from transformers import Mamba2ForCausalLM as HFMamba2ForCausalLM

import zoo  # noqa: F401
from zoo.convert import convert
from zoo.models.mamba.convert_mamba import RENAMES
from zoo.models.mamba2 import Mamba2ForCausalLM
from zoo.models.mamba2.convert_mamba2 import from_transformers, to_transformers

SIZES = dict(
    vocab_size=259,
    hidden_size=32,
    num_heads=8,
    head_dim=8,
    state_size=8,
    n_groups=2,
    num_hidden_layers=2,
    expand=2,
    conv_kernel=4,
    chunk_size=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_mamba2(**overrides):
    torch.manual_seed(0)
    model = HFMamba2ForCausalLM(Mamba2Config(**{**SIZES, **overrides})).eval()
    with torch.no_grad():  # away from initialisation, so that every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_groups": 1}, {"n_groups": 8, "use_bias": True}, {"time_step_limit": (0.0, 0.05)}],
    ids=["groups2", "groups1", "groups8-bias", "dt-limit"],
)
def test_equal_logits_to_transformers(overrides):
    hf = hf_mamba2(**overrides)
    ours = from_transformers(hf).eval()
    assert isinstance(ours, Mamba2ForCausalLM)
    ids = torch.randint(3, 259, (2, 37))  # not a multiple of the chunk size
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, use_cache=False).logits
    assert rel_err(got, expected) < 1e-4, rel_err(got, expected)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_groups": 1}, {"n_groups": 8, "use_bias": True}, {"time_step_limit": (0.0, 0.05)}],
    ids=["groups2", "groups1", "groups8-bias", "dt-limit"],
)
@pytest.mark.parametrize("one_row_blocks", [False, True], ids=["", "row-blocks"])
def test_training_gradients_equal_transformers(monkeypatch, overrides, one_row_blocks):
    """A training step: the loss on every token and the gradient of every parameter equal transformers' (its
    chunked torch path, in training mode); the time-step limit also clamps the gradient of dt. With
    ``one_row_blocks`` the convolution's backward runs in the shortest blocks of time steps (its K)."""
    if one_row_blocks:
        from zoo.ops import blocking

        monkeypatch.setattr(blocking, "BLOCK_ELEMENTS", 1)
    hf = hf_mamba2(**overrides).train()
    ours = from_transformers(hf).train()
    ids = torch.randint(3, 259, (2, 37))
    expected, got = hf(ids, labels=ids).loss, ours(ids, labels=ids, use_cache=False).loss
    assert rel_err(got, expected) < 1e-5
    expected.backward()
    got.backward()
    hf_grads = {}
    for name, p in hf.named_parameters():
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        hf_grads[name] = p.grad
    checked = 0
    for name, p in ours.named_parameters():
        assert p.grad is not None and hf_grads[name] is not None, name
        assert rel_err(p.grad, hf_grads[name]) < 1e-4, (name, rel_err(p.grad, hf_grads[name]))
        checked += 1
    assert checked == len(hf_grads)


def test_greedy_generation_equals_transformers():
    hf = hf_mamba2()
    ours = from_transformers(hf).eval()
    ids = torch.randint(3, 259, (2, 9))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(ids, **kw), hf.generate(ids, **kw), rtol=0, atol=0)


def test_left_padded_batch_equals_transformers():
    hf = hf_mamba2()
    ours = from_transformers(hf).eval()
    ids = torch.randint(3, 259, (2, 15))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, use_cache=False).logits
    assert rel_err(got[0, 6:], expected[0, 6:]) < 1e-4
    assert rel_err(got[1], expected[1]) < 1e-4


def test_convert_entry_point_both_ways(tmp_path):
    hf = hf_mamba2()
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "zoo")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours) is Mamba2ForCausalLM
    convert(tmp_path / "zoo", tmp_path / "back")
    back = HFMamba2ForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, 259, (1, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(ours(ids, use_cache=False).logits, expected) < 1e-4
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)
    assert rel_err(to_transformers(ours)(ids).logits.detach(), expected) < 1e-6


def test_chunk_length_is_left_to_the_op_and_converts_back():
    """transformers' chunk_size tunes its own kernels: a converted model leaves the chunk to zoo's op (the CPU path
    picks it from the head sizes); the conversion back writes transformers' default, or zoo's chunk_size when set."""
    from zoo.ops.retention import default_chunk_size

    hf = hf_mamba2(chunk_size=256)
    ours = from_transformers(hf)
    assert ours.config.chunk_size is None
    mixer = ours.model.layers[0].mixer
    assert mixer.scan_chunk_size(torch.device("cpu")) == default_chunk_size("torch", 8, 8) == 16
    assert to_transformers(ours).config.chunk_size == Mamba2Config().chunk_size
    ours.config.chunk_size = 32
    assert mixer.scan_chunk_size(torch.device("cpu")) == 32
    assert to_transformers(ours).config.chunk_size == 32
    with pytest.raises(ValueError, match="chunk_size"):
        Mamba2ForCausalLM.config_class(**{**SIZES, "chunk_size": 0})
