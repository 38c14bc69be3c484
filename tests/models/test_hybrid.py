"""zoo's Mamba/attention hybrid: against transformers' ``BambaForCausalLM`` (same weights through ``zoo.convert``:
logits, greedy generation, padded batches, the conversion back, the command-line entry point), a Samba-like stack
against the equations written out here (transformers' Mamba mixer, dense sliding-window softmax attention with
partial rotary positions, SwiGLU), and the bounded key/value cache of sliding-window layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, BambaConfig, BambaForCausalLM, MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

import zoo  # noqa: F401
from tests.models.decoding import full_and_incremental_logits
from zoo.convert import convert
from zoo.models.hybrid import HybridForCausalLM, ZooHybridConfig
from zoo.models.hybrid.convert_bamba import from_transformers, to_transformers

BAMBA = dict(
    vocab_size=259,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_layer_indices=[1],
    mamba_n_heads=8,
    mamba_d_head=8,
    mamba_d_state=8,
    mamba_n_groups=2,
    mamba_chunk_size=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def perturbed(model):
    """Random weights away from initialisation, so that every parameter matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_bamba(**overrides):
    torch.manual_seed(0)
    return perturbed(BambaForCausalLM(BambaConfig(**{**BAMBA, **overrides})))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attn_layer_indices": [0, 2], "mamba_n_groups": 1, "attention_bias": True},
        {"mamba_proj_bias": True, "mlp_bias": True, "time_step_limit": (0.0, 0.05)},
    ],
    ids=["one-attention", "two-attention-bias", "biases-dt-limit"],
)
def test_equal_logits_to_bamba(overrides):
    hf = hf_bamba(**overrides)
    ours = from_transformers(hf).eval()
    assert isinstance(ours, HybridForCausalLM)
    ids = torch.randint(3, 259, (2, 37))  # not a multiple of the chunk size
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, use_cache=False).logits
    assert rel_err(got, expected) < 1e-4, rel_err(got, expected)


def test_greedy_generation_equals_bamba():
    hf = hf_bamba()
    ours = from_transformers(hf).eval()
    ids = torch.randint(3, 259, (2, 9))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(ids, **kw), hf.generate(ids, **kw), rtol=0, atol=0)


def test_left_padded_batch_equals_bamba():
    hf = hf_bamba()
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
    hf = hf_bamba()
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "zoo")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours) is HybridForCausalLM
    assert ours.config.layer_types == ["mamba2", "attention", "mamba2"]
    convert(tmp_path / "zoo", tmp_path / "back")
    back = BambaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, 259, (1, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(ours(ids, use_cache=False).logits, expected) < 1e-4
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)
        assert rel_err(to_transformers(ours)(ids).logits, expected) < 1e-6


def test_conversion_to_bamba_refuses_what_bamba_cannot_express():
    samba = HybridForCausalLM(samba_config())
    with pytest.raises(ValueError, match="'mamba'"):
        to_transformers(samba)


def samba_config(**overrides):
    return ZooHybridConfig(
        **{
            **dict(
                vocab_size=259,
                hidden_size=32,
                layer_types=["mamba", "sliding_attention", "mamba", "sliding_attention"],
                mlp_layers=[True, True, False, True],
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                mamba=dict(state_size=8, expand=2, conv_kernel=4),
            ),
            **overrides,
        }
    )


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, positions, rotary_dim, theta):
    """Rotary positions on the first ``rotary_dim`` channels of ``x`` (B, H, T, D), halves convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    angles = positions[:, None].float() * inv_freq[None]  # (T, rotary_dim / 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated * sin, rest], -1)


def sliding_attention(attn, x, window, rotary_dim, theta):
    """softmax(q kᵀ / sqrt(d)) v over keys j with i - window < j <= i, key/value heads shared by query groups."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    pos = torch.arange(T)
    q, k = rotate(q, pos, rotary_dim, theta), rotate(k, pos, rotary_dim, theta)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    i, j = pos[:, None], pos[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    out = scores.softmax(-1) @ v  # (B, H, T, D)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@torch.no_grad()
def samba_reference(model, ids):
    cfg, backbone = model.config, model.model
    x = backbone.embed_tokens(ids)
    for i, layer in enumerate(backbone.layers):
        h = rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        if cfg.layer_types[i] == "mamba":
            m = cfg.mamba
            hf_mixer = HFMambaMixer(
                MambaConfig(
                    hidden_size=cfg.hidden_size,
                    state_size=m["state_size"],
                    expand=m["expand"],
                    conv_kernel=m["conv_kernel"],
                    time_step_rank=layer.mamba.time_step_rank,
                ),
                layer_idx=i,
            )
            hf_mixer.load_state_dict(layer.mamba.state_dict())
            out = hf_mixer(h)
        else:
            out = sliding_attention(
                layer.self_attn, h, cfg.sliding_window, cfg.rotary_dim, cfg.rope_parameters["rope_theta"]
            )
        x = x + out
        if cfg.mlp_after(i):
            mlp = layer.feed_forward
            h = rms(x, layer.pre_ff_layernorm.weight, cfg.rms_norm_eps)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    return model.lm_head(rms(x, backbone.norm.weight, cfg.rms_norm_eps))


def test_samba_equals_its_equations_written_out():
    torch.manual_seed(0)
    model = perturbed(HybridForCausalLM(samba_config()))
    ids = torch.randint(3, 259, (2, 29))  # several windows long
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    expected = samba_reference(model, ids)
    assert rel_err(got, expected) < 1e-4, rel_err(got, expected)


def test_sliding_window_cache_stays_bounded_and_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = perturbed(HybridForCausalLM(samba_config()))
    ids = torch.randint(3, 259, (2, 30))
    full, incremental, cache = full_and_incremental_logits(model, ids, prefix=11)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)
    window = model.config.sliding_window
    assert cache.get_seq_length() == 30
    for i, kind in enumerate(model.config.layer_types):
        if kind == "sliding_attention":
            assert cache.kv[i].keys.shape[2] == window - 1  # never more than the window needs
        else:
            assert cache.get(i)["ssm"].shape == (2, 64, 8)  # (B, expand * hidden_size, state_size)
    # a prefix shorter than the window, decoded several tokens at a time across the window's edge
    full, incremental, _ = full_and_incremental_logits(model, ids, prefix=3, step=4)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)


def test_bad_configs_are_errors_naming_the_field():
    with pytest.raises(ValueError, match="layer_types.*'lstm'"):
        ZooHybridConfig(layer_types=["mamba", "lstm"])
    with pytest.raises(ValueError, match="sliding_window"):
        ZooHybridConfig(layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match="mlp_layers"):
        ZooHybridConfig(layer_types=["mamba", "attention"], mlp_layers=[True])
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ZooHybridConfig(layer_types=["mamba", "attention"], num_hidden_layers=3)
    with pytest.raises(ValueError, match="mamba2.*num_heads"):
        ZooHybridConfig(hidden_size=32, mamba2=dict(num_heads=5, head_dim=8))
    with pytest.raises(ValueError, match="mamba.*'stat_size'"):
        ZooHybridConfig(layer_types=["mamba"], mamba=dict(stat_size=8))
