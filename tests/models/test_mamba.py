"""Mamba against transformers' ``MambaForCausalLM`` and ``FalconMambaForCausalLM`` (same weights through
``zoo.convert``): logits, greedy generation, padded batches, the conversion back, and the command-line entry
point."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM as HFMambaForCausalLM

import zoo  # noqa: F401
from zoo.convert import convert
from zoo.models.mamba import MambaForCausalLM
from zoo.models.mamba.convert_mamba import from_transformers, to_transformers

SIZES = dict(
    vocab_size=259,
    hidden_size=32,
    state_size=8,
    num_hidden_layers=2,
    expand=2,
    conv_kernel=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_mamba(**overrides):
    torch.manual_seed(0)
    model = HFMambaForCausalLM(HFMambaConfig(**{**SIZES, **overrides})).eval()
    # random weights away from initialisation, so that every parameter matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "overrides", [{}, {"use_bias": True, "use_conv_bias": False}, {"hidden_act": "gelu"}]
)
def test_equal_logits_to_transformers(overrides):
    hf = hf_mamba(**overrides)
    ours = from_transformers(hf).eval()
    assert isinstance(ours, MambaForCausalLM)
    ids = torch.randint(3, 259, (2, 37))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, use_cache=False).logits
    assert rel_err(got, expected) < 1e-4, rel_err(got, expected)


def test_greedy_generation_equals_transformers():
    hf = hf_mamba()
    ours = from_transformers(hf).eval()
    ids = torch.randint(3, 259, (2, 9))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(ids, **kw), hf.generate(ids, **kw), rtol=0, atol=0)


def test_left_padded_batch_equals_transformers():
    hf = hf_mamba()
    ours = from_transformers(hf).eval()
    ids = torch.randint(3, 259, (2, 15))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, use_cache=False).logits
    assert rel_err(got[0, 6:], expected[0, 6:]) < 1e-4
    assert rel_err(got[1], expected[1]) < 1e-4


def test_conversion_back_to_transformers():
    ours = from_transformers(hf_mamba()).eval()
    back = to_transformers(ours).eval()
    ids = torch.randint(3, 259, (1, 21))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_convert_entry_point_both_ways(tmp_path):
    hf = hf_mamba()
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "zoo")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours) is MambaForCausalLM
    convert(tmp_path / "zoo", tmp_path / "back")
    back = HFMambaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, 259, (1, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(ours(ids, use_cache=False).logits, expected) < 1e-4
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="config.json"):
        convert(tmp_path, tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def hf_falcon_mamba(**overrides):
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    torch.manual_seed(0)
    model = FalconMambaForCausalLM(FalconMambaConfig(**{**SIZES, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [{}, {"mixer_rms_eps": 1e-3, "use_bias": True}])
def test_falcon_mamba_equal_logits_to_transformers(overrides):
    hf = hf_falcon_mamba(**overrides)
    ours = from_transformers(hf).eval()
    assert ours.config.mixer_rms_norm and ours.config.mixer_rms_eps == hf.config.mixer_rms_eps
    ids = torch.randint(3, 259, (2, 37))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, use_cache=False).logits
        without_norms = MambaForCausalLM(
            ours.config.__class__(**{**ours.config.to_dict(), "mixer_rms_norm": False})
        )
    assert rel_err(got, expected) < 1e-4, rel_err(got, expected)
    # the norms matter: the same weights without them compute something else
    without_norms.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert rel_err(without_norms.eval()(ids, use_cache=False).logits, expected) > 1e-2


def test_falcon_mamba_greedy_generation_and_padding_equal_transformers():
    hf = hf_falcon_mamba()
    ours = from_transformers(hf).eval()
    ids = torch.randint(3, 259, (2, 9))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(ids, **kw), hf.generate(ids, **kw), rtol=0, atol=0)
    ids = torch.randint(3, 259, (2, 15))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, use_cache=False).logits
    assert rel_err(got[0, 6:], expected[0, 6:]) < 1e-4
    assert rel_err(got[1], expected[1]) < 1e-4


def test_falcon_mamba_convert_entry_point_both_ways(tmp_path):
    from transformers import FalconMambaForCausalLM

    hf = hf_falcon_mamba()
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "zoo")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours) is MambaForCausalLM and ours.config.mixer_rms_norm
    convert(tmp_path / "zoo", tmp_path / "back")
    back = FalconMambaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, 259, (1, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(ours(ids, use_cache=False).logits, expected) < 1e-4
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)
