"""The baseline transformer against transformers' Llama (same weights, equal logits) and its position options."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.models.decoding import full_and_incremental_logits
from zoo.models.transformer import TransformerConfig, TransformerForCausalLM
from zoo.models.transformer.convert_transformer import from_llama

SIZES = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.5 + 0.25 * i for i in range(8)],
            "original_max_position_embeddings": 32,
        },
    ],
    ids=["default", "linear", "dynamic", "yarn", "llama3", "longrope"],
)
@pytest.mark.parametrize("tied", [False, True])
def test_equal_logits_to_llama(rope, tied):
    torch.manual_seed(0)
    llama_config = LlamaConfig(**SIZES, tie_word_embeddings=tied, pad_token_id=0)
    if rope is not None:
        llama_config = LlamaConfig(
            **SIZES, tie_word_embeddings=tied, pad_token_id=0, rope_parameters={"rope_theta": 10000.0, **rope}
        )
    # float32: transformers' Llama computes its norms and rotary tables in float32 whatever the input dtype.
    llama = LlamaForCausalLM(llama_config).eval()
    zoo_model = from_llama(llama).eval()
    # Past max_position_embeddings, so that scaled and dynamic frequencies are exercised.
    ids = torch.randint(3, 259, (2, 100))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    pos = torch.arange(100).expand(2, 100)
    with torch.no_grad():
        expected = llama(ids, attention_mask=mask, position_ids=pos).logits
        got = zoo_model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 7:], expected[1, 7:], rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_llama():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SIZES, pad_token_id=0)).eval()
    zoo_model = from_llama(llama).eval()
    ids = torch.randint(3, 259, (1, 10))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(zoo_model.generate(ids, **kw), llama.generate(ids, **kw), rtol=0, atol=0)


def _reference_attention_logits(model, ids, allowed):
    """Logits computed with an explicit boolean mask ``allowed[i, j]`` instead of the model's own masking."""
    from zoo.modules import attention as attention_module

    original = attention_module.build_attention_mask
    try:
        attention_module_mask = allowed[None, None].expand(ids.shape[0], 1, *allowed.shape)
        import zoo.models.transformer.modeling_transformer as modeling

        modeling.build_attention_mask = lambda **_: attention_module_mask
        return model(ids, use_cache=False).logits
    finally:
        modeling.build_attention_mask = original


def test_sliding_window_matches_explicit_band_mask():
    torch.manual_seed(0)
    config = TransformerConfig(**SIZES, sliding_window=5)
    model = TransformerForCausalLM(config).eval()
    ids = torch.randint(3, 259, (2, 20))
    i, j = torch.arange(20)[:, None], torch.arange(20)[None]
    band = (j <= i) & (i - j < 5)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        expected = _reference_attention_logits(model, ids, band)
        full = _reference_attention_logits(model, ids, j <= i)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got[:, 10:], full[:, 10:])


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("prefix,step", [(3, 1), (9, 1), (9, 3)])
def test_sliding_window_decoding_is_bounded_and_equals_full_forward(position, prefix, step):
    """The cache keeps only the last window - 1 keys per layer, and decoding (one or several tokens at a time,
    from a prefix shorter or longer than the window) gives the logits of the full forward."""
    torch.manual_seed(0)
    config = TransformerConfig(**SIZES, sliding_window=5, position_embedding_type=position)
    model = TransformerForCausalLM(config).eval()
    ids = torch.randint(3, 259, (2, 21))
    full, incremental, cache = full_and_incremental_logits(model, ids, prefix, step)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]
    assert all(layer.keys.shape[2] == config.sliding_window - 1 for layer in cache.layers)


def test_sliding_window_generate_with_left_padding():
    """generate() on a left-padded batch with a bounded cache equals greedy decoding by full forwards."""
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(**SIZES, sliding_window=4)).eval()
    ids = torch.randint(3, 259, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    got = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    seq, attn = ids, mask
    with torch.no_grad():
        for _ in range(8):
            logits = model(seq, attention_mask=attn, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
    torch.testing.assert_close(got, seq)


@pytest.mark.parametrize("position", ["alibi", "learned", "none"])
def test_position_options_decode_like_full_forward(position):
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(**SIZES, position_embedding_type=position)).eval()
    full, incremental, _ = full_and_incremental_logits(model, torch.randint(3, 259, (1, 12)), prefix=4)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)


def test_alibi_bias_matches_its_definition():
    from zoo.modules import alibi_slopes

    assert torch.allclose(alibi_slopes(8), torch.tensor([2 ** (-(i + 1)) for i in range(8)]))
    slopes = alibi_slopes(6)
    assert slopes.shape == (6,) and torch.all(slopes > 0) and torch.all(slopes < 1)


def test_learned_positions_have_a_hard_limit():
    model = TransformerForCausalLM(TransformerConfig(**SIZES, position_embedding_type="learned")).eval()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.randint(3, 259, (1, 65)))


def test_field_types_are_checked_on_construction_and_assignment():
    """huggingface_hub's strict dataclass validation, raised as a ValueError naming the field."""
    with pytest.raises(ValueError, match="TransformerConfig: Field 'hidden_size' expected int"):
        TransformerConfig(**{**SIZES, "hidden_size": "64"})
    with pytest.raises(ValueError, match="'mlp_type' expected one of"):
        TransformerConfig(**SIZES, mlp_type="gelu")
    config = TransformerConfig(**SIZES, attention_dropout=0)  # a whole number where Llama allows one
    with pytest.raises(ValueError, match="'num_hidden_layers' expected int, got float"):
        config.num_hidden_layers = 2.5
    with pytest.raises(ValueError, match="'sliding_window'"):
        config.sliding_window = "4"
    assert config.num_hidden_layers == 2 and config.sliding_window is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TransformerConfig(**{**SIZES, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="num_attention_heads=8 must be positive and divide hidden_size=36"):
        TransformerConfig(**{**SIZES, "hidden_size": 36, "num_attention_heads": 8, "num_key_value_heads": 8})
    # with an explicit head width the heads need not divide the residual width
    assert (
        TransformerConfig(**{**SIZES, "hidden_size": 36, "num_attention_heads": 8, "head_dim": 8}).head_dim
        == 8
    )
    with pytest.raises(ValueError, match="rope_type"):
        TransformerForCausalLM(
            TransformerConfig(**SIZES, rope_parameters={"rope_type": "nope", "rope_theta": 1e4})
        )


def _band_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 259, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None].expand(3, 20).clone()
    pos[0] = torch.arange(20)
    return ids, mask, pos


@pytest.mark.parametrize(
    "overrides",
    [{}, {"sliding_window": 5}, {"position_embedding_type": "alibi"}, {"num_key_value_heads": 4}],
    ids=["rope", "sliding", "alibi", "mha"],
)
def test_attention_implementations_agree(overrides):
    """``attn_implementation`` picks transformers' kernel: eager (its reference) and sdpa give the same logits
    with padding, packed documents, sliding windows and ALiBi, and decoding with the cache."""
    config = TransformerConfig(**{**SIZES, **overrides})
    torch.manual_seed(0)
    sdpa = TransformerForCausalLM(config).eval()
    eager = TransformerForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    ids, mask, pos = _band_inputs()
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask}, {"position_ids": pos[1:]}):
            rows = slice(1, None) if "position_ids" in kwargs else slice(None)
            a = sdpa(ids[rows], use_cache=False, **kwargs).logits
            b = eager(ids[rows], use_cache=False, **kwargs).logits
            keep = (
                mask[rows, :, None].bool() if "attention_mask" in kwargs else torch.ones_like(a, dtype=bool)
            )
            torch.testing.assert_close(a * keep, b * keep, rtol=1e-5, atol=1e-5)
    full, incremental, _ = full_and_incremental_logits(eager, ids[1:], prefix=7, step=3)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_registered_attention_function_is_honoured():
    """A kernel registered with transformers' ``AttentionInterface`` runs when named; one that takes no dense
    mask is refused (with its name) where a mask is needed, instead of attending across padding."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting(module, q, k, v, mask, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("zoo_test_counting", counting)
    config = TransformerConfig(**SIZES)
    torch.manual_seed(0)
    sdpa = TransformerForCausalLM(config).eval()
    counted = TransformerForCausalLM._from_config(
        copy.deepcopy(config), attn_implementation="zoo_test_counting"
    )
    counted.eval()
    counted.load_state_dict(sdpa.state_dict())
    ids, mask, _ = _band_inputs()
    with torch.no_grad():
        torch.testing.assert_close(counted(ids).logits, sdpa(ids).logits, rtol=1e-6, atol=1e-6)
        assert calls == list(range(config.num_hidden_layers))
        with pytest.raises(ValueError, match="zoo_test_counting.*takes no dense attention mask"):
            counted(ids, attention_mask=mask)


def test_convert_entry_point_llama_both_ways(tmp_path):
    from transformers import AutoModelForCausalLM

    from zoo.convert import convert

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SIZES, pad_token_id=0)).eval()
    llama.save_pretrained(tmp_path / "llama")
    convert(tmp_path / "llama", tmp_path / "zoo")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours) is TransformerForCausalLM
    convert(tmp_path / "zoo", tmp_path / "back")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, 259, (1, 19))
    with torch.no_grad():
        expected = llama(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)
