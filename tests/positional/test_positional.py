"""Context-extension tools: RoPE scaling against transformers' frequencies, learned tables, random positions."""

import math

import pytest
import torch

from zoo.models.transformer import TransformerConfig, TransformerForCausalLM
from zoo.positional import (
    chunked_forward,
    extend_context,
    interpolate_position_embeddings,
    randomize_packed_positions,
    randomized_position_ids,
    rope_parameters_for,
)

SIZES = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=64,
)
WINDOW = 64


def _angles(config, params, length, batch_positions=None):
    """Rotation angles (B, T, dim/2) and the cos/sin scaling for positions 0..length-1 under ``params``."""
    cfg = TransformerConfig(**{**SIZES, "rope_parameters": params})
    model = TransformerForCausalLM(cfg)
    rotary = model.model.rotary_emb
    pos = torch.arange(length)[None] if batch_positions is None else batch_positions
    cos, sin = rotary(torch.zeros(1), pos)
    half = cos.shape[-1] // 2
    return torch.atan2(sin[..., :half], cos[..., :half]), rotary.attention_scaling


def _expected_rotation(params: dict, dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, dim) at positions 0..length-1, from each method's own definition, written out here."""
    theta, s = params["rope_theta"], params.get("factor", 1.0)
    L0 = params.get("original_max_position_embeddings", WINDOW)
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    inv = theta ** (-i / dim)  # Su et al.: theta^(-2k/d)
    kind, scale = params["rope_type"], 1.0
    if kind == "linear":  # Chen et al.: positions divided by s
        inv = inv / s
    elif kind == "dynamic" and length > L0:  # dynamic NTK: base grows with the current length
        base = theta * ((s * length / L0) - (s - 1)) ** (dim / (dim - 2))
        inv = base ** (-i / dim)
    elif kind == "yarn":  # Peng et al.: ramp between the correction dims of beta=32 and alpha=1 rotations

        def correction_dim(rotations):
            return dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(32)), 0)
        high = min(math.ceil(correction_dim(1)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate (divided by s)
        inv = inv / s * (1 - keep) + inv * keep
        scale = 0.1 * math.log(s) + 1.0
    elif (
        kind == "llama3"
    ):  # band-wise: wavelengths past L0 / low_freq_factor interpolated, below L0 / high kept
        lo, hi = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = ((L0 / wavelen - lo) / (hi - lo)).clamp(0, 1)
        banded = torch.where(wavelen > L0 / lo, inv / s, (1 - smooth) * inv / s + smooth * inv)
        inv = torch.where(wavelen < L0 / hi, inv, banded)
    elif kind == "longrope":  # Ding et al.: per-dimension factors, the long ones past the original window
        inv = inv / torch.tensor(
            params["long_factor" if length > L0 else "short_factor"], dtype=torch.float64
        )
        scale = math.sqrt(1 + math.log(s) / math.log(L0))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


@pytest.mark.parametrize("method", ["none", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3"])
def test_frequencies_follow_each_methods_definition(method):
    """The rotary tables of every scaling method against its formula written out in this test (independent of
    transformers' ROPE_INIT_FUNCTIONS, which the rotary module uses), inside and past the original window."""
    config = TransformerConfig(**SIZES)
    params = dict(config.rope_parameters) if method == "none" else rope_parameters_for(config, method, 4.0)
    ours = TransformerForCausalLM(TransformerConfig(**{**SIZES, "rope_parameters": params})).model.rotary_emb
    dim = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    for length in (WINDOW // 2, 4 * WINDOW):
        cos, sin = ours(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
        want_cos, want_sin = _expected_rotation(params, dim, length)
        # float32 tables: angles up to 4 * WINDOW radians carry ~3e-5 absolute error
        torch.testing.assert_close(cos[0].double(), want_cos, rtol=0, atol=1e-4)
        torch.testing.assert_close(sin[0].double(), want_sin, rtol=0, atol=1e-4)


def test_positions_inside_the_window_where_promised():
    # A Llama-like window (4096) so that YaRN's "fast" band (>= 32 turns inside the window) is populated.
    config = TransformerConfig(**{**SIZES, "max_position_embeddings": 4096})

    def inv_freq(params):
        return TransformerForCausalLM(
            TransformerConfig(**{**SIZES, "max_position_embeddings": 4096, "rope_parameters": params})
        ).model.rotary_emb.inv_freq

    original = inv_freq(config.rope_parameters)

    def freq_change(method):
        """Mean |1 - scaled/original frequency| over the fastest quarter of the dimensions, and over all."""
        ratio = inv_freq(rope_parameters_for(config, method, 4.0)) / original
        quarter = ratio.numel() // 4
        return (1 - ratio[:quarter]).abs().mean().item(), (1 - ratio).abs().mean().item()

    pi_high, pi_all = freq_change("linear")
    assert pi_high == pytest.approx(0.75), "position interpolation slows every frequency, in-window ones too"
    for method in ("ntk", "yarn"):
        high, overall = freq_change(method)
        assert high < 0.2 * pi_high, (method, high, pi_high)
        assert overall < pi_all, (method, overall, pi_all)
    assert freq_change("yarn")[0] < 1e-6, "YaRN keeps the fastest frequencies exactly"
    # Dynamic NTK computes the original angles for every position inside the original window.
    small = TransformerConfig(**SIZES)
    base, _ = _angles(small, small.rope_parameters, WINDOW)
    angles, scale = _angles(small, rope_parameters_for(small, "dynamic", 4.0), WINDOW)
    torch.testing.assert_close(angles, base)
    assert scale == 1.0


@pytest.mark.parametrize("method", ["linear", "ntk", "yarn", "dynamic", "longrope", "llama3"])
def test_extend_context_equals_config_route(method, tmp_path):
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(**SIZES)).eval()
    model.save_pretrained(tmp_path)
    params = rope_parameters_for(model.config, method, 4.0)
    extended = extend_context(model, method, 4.0)
    expected_max = WINDOW if method == "dynamic" else 4 * WINDOW
    assert extended.config.max_position_embeddings == expected_max
    reloaded = TransformerForCausalLM.from_pretrained(tmp_path, rope_parameters=params).eval()
    ids = torch.randint(3, 259, (1, 3 * WINDOW))
    with torch.no_grad():
        torch.testing.assert_close(extended(ids).logits, reloaded(ids).logits)
    # The scaling travels with a saved model.
    extended.save_pretrained(tmp_path / "ext")
    again = TransformerForCausalLM.from_pretrained(tmp_path / "ext").eval()
    assert again.config.rope_parameters["rope_type"] == params["rope_type"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, extended(ids).logits)


def test_bad_scaling_requests_name_the_problem():
    model = TransformerForCausalLM(TransformerConfig(**SIZES))
    with pytest.raises(ValueError, match="'bogus'"):
        extend_context(model, "bogus", 2.0)
    with pytest.raises(ValueError, match="factor=0.5"):
        extend_context(model, "yarn", 0.5)
    alibi = TransformerForCausalLM(TransformerConfig(**SIZES, position_embedding_type="alibi"))
    with pytest.raises(ValueError, match="alibi"):
        extend_context(alibi, "yarn", 2.0)


def test_learned_table_interpolation():
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(**SIZES, position_embedding_type="learned")).eval()
    old = model.model.embed_positions.weight.detach().clone()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(3, 259, (1, 100)))
    interpolate_position_embeddings(model, 128)
    new = model.model.embed_positions.weight
    assert new.shape == (128, old.shape[1]) and model.config.max_position_embeddings == 128
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[-1], old[-1])
    # Every new row lies between the two nearest old rows (linear resampling, aligned corners).
    where = torch.linspace(0, old.shape[0] - 1, new.shape[0])
    below, above = old[where.floor().long()], old[where.ceil().long()]
    lo, hi = torch.minimum(below, above), torch.maximum(below, above)
    assert bool(((new >= lo - 1e-6) & (new <= hi + 1e-6)).all())
    assert model(torch.randint(3, 259, (1, 100))).logits.shape == (1, 100, 259)
    copy = TransformerForCausalLM(TransformerConfig(**SIZES, position_embedding_type="learned"))
    interpolate_position_embeddings(copy, 128, mode="copy")
    torch.testing.assert_close(copy.model.embed_positions.weight[64:], copy.model.embed_positions.weight[:64])


def test_randomized_positions():
    g = torch.Generator().manual_seed(0)
    pos = randomized_position_ids(3, 16, 256, generator=g)
    assert pos.shape == (3, 16)
    assert (pos[:, 0] == 0).all() and (pos.diff(dim=-1) > 0).all() and (pos < 256).all()
    assert pos.max() > 16, "positions reach past the training length"
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    out = randomize_packed_positions(packed, 64, generator=g)
    assert (
        out[0, 0] == 0 and out[0, 4] == 0 and (out[0, :4].diff() > 0).all() and (out[0, 4:].diff() > 0).all()
    )
    with pytest.raises(ValueError, match="max_position=8"):
        randomized_position_ids(1, 16, 8)


def test_chunked_forward_equals_full_forward():
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(**SIZES)).eval()
    ids = torch.randint(3, 259, (2, 50))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    logits, cache = chunked_forward(model, ids, chunk_size=16)
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 50


def test_chunked_state_passing_of_a_recurrent_model():
    from zoo.models.retnet import RetNetConfig, RetNetForCausalLM

    torch.manual_seed(0)
    model = RetNetForCausalLM(
        RetNetConfig(
            vocab_size=259,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            chunk_size=8,
        )
    ).eval()
    ids = torch.randint(3, 259, (1, 90))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    sizes = []
    for length in (30, 90):
        logits, cache = chunked_forward(model, ids[:, :length], chunk_size=16)
        torch.testing.assert_close(logits, full[:, :length], rtol=1e-4, atol=1e-5)
        sizes.append(sum(t.numel() for s in cache.states.values() for t in s.values()))
    assert sizes[0] == sizes[1], "the carried state does not grow with the input"
