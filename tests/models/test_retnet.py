"""RetNet: the three retention modes agree, the torchscale layout maps in, decoding is O(1) in the context."""

import math

import pytest
import torch

from tests.models.decoding import full_and_incremental_logits
from zoo.models.retnet import RetNetConfig, RetNetForCausalLM
from zoo.models.retnet.convert_retnet import from_torchscale, torchscale_to_zoo
from zoo.models.utils import output_cache
from zoo.modules import RecurrentCache

SIZES = dict(
    vocab_size=259,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    chunk_size=8,
)


def _model(**kw):
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(**{**SIZES, **kw})).eval().double()


def _logits(model, ids, mode, **kw):
    model.config.retention_mode = mode
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("decay", ["fixed", "data_dependent"])
@pytest.mark.parametrize("position_encoding", ["rotary", "xpos"])
def test_parallel_chunk_recurrent_agree(decay, position_encoding):
    model = _model(decay=decay, position_encoding=position_encoding)
    if decay == "data_dependent":
        # Spread the gates so the decay really varies per token.
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.retention.decay_proj.weight, std=1.0)
            torch.nn.init.zeros_(layer.retention.decay_proj.bias)
    ids = torch.randint(3, 259, (2, 29))
    ref = _logits(model, ids, "parallel")
    for mode in ("chunk", "recurrent"):
        torch.testing.assert_close(_logits(model, ids, mode), ref, rtol=1e-9, atol=1e-9)


def test_chunk_mode_on_the_triton_backend_matches_parallel():
    model = _model(backend="triton", chunk_size=16).float()
    ids = torch.randint(3, 259, (1, 21))
    ref = _logits(model, ids, "parallel")
    torch.testing.assert_close(_logits(model, ids, "chunk"), ref, rtol=1e-3, atol=1e-4)


def test_triton_backend_trains_under_bf16_autocast():
    """CPU bf16 autocast (accelerate's mixed_precision) hands the op bf16 q/k/v: the Triton kernels take them and
    the loss and gradients stay within bf16's resolution of the torch backend's under the same autocast."""
    ids = torch.randint(3, 259, (1, 21))
    losses, grads = {}, {}
    for backend in ("torch", "triton"):
        model = _model(backend=backend, chunk_size=16).float().train()
        model.config.retention_mode = "chunk"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses[backend] = loss.item()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(grads[backend]).all()
    assert abs(losses["triton"] - losses["torch"]) < 2e-2 * abs(losses["torch"])
    cos = torch.nn.functional.cosine_similarity(grads["triton"], grads["torch"], dim=0)
    assert cos > 0.99, cos


def test_normalisation_switch_changes_the_output():
    # The normalisations' exact form is checked against the literal torchscale rendering below.
    model = _model()
    ids = torch.randint(3, 259, (1, 20))
    base = _logits(model, ids, "parallel")
    model.config.normalize = False
    assert not torch.allclose(_logits(model, ids, "parallel"), base)
    torch.testing.assert_close(_logits(model, ids, "chunk"), _logits(model, ids, "parallel"))


def test_paper_decays_and_bad_config():
    config = RetNetConfig(**SIZES)
    assert config.gammas() == [1 - 2**-5, 1 - 2**-6]
    with pytest.raises(ValueError, match="decay_gammas"):
        RetNetConfig(**SIZES, decay_gammas=[0.9])
    with pytest.raises(ValueError, match="retention_mode"):
        RetNetConfig(**SIZES, retention_mode="fast")
    # field types are checked on assignment too (huggingface_hub's strict dataclass validation)
    with pytest.raises(ValueError, match="RetNetConfig: Field 'retention_mode' expected one of"):
        config.retention_mode = "fast"
    with pytest.raises(ValueError, match="'normalize' expected bool"):
        config.normalize = 1


def _torchscale_reference(sd, config, ids, xpos_base=None):
    """An independent, literal rendering of torchscale's RetNet decoder in parallel mode, on torchscale names.

    With ``xpos_base``, q and k are also scaled the xPos way after the rotation (Sun et al. 2022): channel pair i
    by zeta_i ** (n / base) in q and zeta_i ** (-n / base) in k, zeta_i = (2i + 0.4 dk) / (1.4 dk)."""
    H, C = config.num_attention_heads, config.hidden_size
    dk, dv = C // H, config.value_dim // H
    T = ids.shape[1]
    angle = 1.0 / (10000 ** torch.linspace(0, 1, dk // 2, dtype=torch.float64))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()
    decay = torch.log(1 - 2 ** (-5 - torch.arange(H, dtype=torch.float64)))
    index = torch.arange(T, dtype=torch.float64)
    sin, cos = torch.sin(index[:, None] * angle[None]), torch.cos(index[:, None] * angle[None])
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask = torch.masked_fill(index[:, None] - index[None, :], ~mask, float("inf"))
    mask = torch.nan_to_num(torch.exp(mask * decay[:, None, None]))
    mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()

    def rms(x, w=None, eps=1e-6):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * w if w is not None else x

    def theta_shift(x):
        x1, x2 = x[..., ::2], x[..., 1::2]
        return x * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin

    q_scale = k_scale = torch.ones(T, dk, dtype=torch.float64)
    if xpos_base is not None:
        zeta = ((torch.arange(0, dk, 2, dtype=torch.float64) + 0.4 * dk) / (1.4 * dk)).repeat_interleave(2)
        q_scale = zeta[None] ** (index[:, None] / xpos_base)
        k_scale = 1 / q_scale

    x = sd["embed_tokens.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "retention_layer_norm.weight"])
        q = h @ sd[p + "retention.q_proj.weight"].T
        k = (h @ sd[p + "retention.k_proj.weight"].T) * dk**-0.5
        v = h @ sd[p + "retention.v_proj.weight"].T
        g = h @ sd[p + "retention.g_proj.weight"].T
        q = theta_shift(q.view(1, T, H, dk).transpose(1, 2)) * q_scale
        k = theta_shift(k.view(1, T, H, dk).transpose(1, 2)) * k_scale
        v = v.view(1, T, H, dv).transpose(1, 2)
        qk = (q @ k.transpose(-1, -2)) * mask
        qk = qk / qk.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)
        o = rms((qk @ v).transpose(1, 2)).reshape(1, T, H * dv)
        x = x + (torch.nn.functional.silu(g) * o) @ sd[p + "retention.out_proj.weight"].T
        h = rms(x, sd[p + "final_layer_norm.weight"])
        ffn = torch.nn.functional.silu(h @ sd[p + "ffn.fc1.weight"].T) * (h @ sd[p + "ffn.gate.weight"].T)
        x = x + ffn @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["layer_norm.weight"]) @ sd["output_projection.weight"].T


def _torchscale_state_dict(config):
    torch.manual_seed(0)
    C, V, F = config.hidden_size, config.value_dim, config.intermediate_size
    sd = {
        "embed_tokens.weight": torch.randn(259, C),
        "layer_norm.weight": 1 + 0.1 * torch.randn(C),
        "output_projection.weight": 0.1 * torch.randn(259, C),
    }
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        sd.update(
            {
                p + "retention.q_proj.weight": 0.2 * torch.randn(C, C),
                p + "retention.k_proj.weight": 0.2 * torch.randn(C, C),
                p + "retention.v_proj.weight": 0.2 * torch.randn(V, C),
                p + "retention.g_proj.weight": 0.2 * torch.randn(V, C),
                p + "retention.out_proj.weight": 0.2 * torch.randn(C, V),
                p + "retention_layer_norm.weight": 1 + 0.1 * torch.randn(C),
                p + "final_layer_norm.weight": 1 + 0.1 * torch.randn(C),
                p + "ffn.fc1.weight": 0.2 * torch.randn(F, C),
                p + "ffn.gate.weight": 0.2 * torch.randn(F, C),
                p + "ffn.fc2.weight": 0.2 * torch.randn(C, F),
            }
        )
    return {k: v.double() for k, v in sd.items()}


@pytest.mark.parametrize("xpos", [False, True])
def test_torchscale_layout_maps_by_renaming(xpos):
    config = RetNetConfig(**SIZES)
    sd = _torchscale_state_dict(config)
    assert set(torchscale_to_zoo(sd)) == {k for k in RetNetForCausalLM(config).state_dict()}
    extra = dict(position_encoding="xpos", xpos_scale_base=16.0) if xpos else {}
    model = (
        from_torchscale({"decoder." + k: v for k, v in sd.items()}, num_heads=2, chunk_size=8, **extra)
        .double()
        .eval()
    )
    ids = torch.randint(3, 259, (1, 19))
    expected = _torchscale_reference(sd, config, ids, xpos_base=16.0 if xpos else None)
    for mode in ("parallel", "chunk", "recurrent"):
        torch.testing.assert_close(_logits(model, ids, mode), expected, rtol=1e-9, atol=1e-9)


def test_convert_entry_point_reads_a_torchscale_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from zoo.convert import convert

    config = RetNetConfig(**SIZES)
    sd = _torchscale_state_dict(config)
    torch.save({"model": {"decoder." + k: v.float() for k, v in sd.items()}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="--heads"):
        convert(tmp_path / "checkpoint.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    convert(tmp_path / "checkpoint.pt", tmp_path / "out", heads=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").double().eval()
    ids = torch.randint(3, 259, (1, 11))
    expected = _torchscale_reference(sd, config, ids)
    torch.testing.assert_close(_logits(model, ids, "parallel"), expected, rtol=1e-6, atol=1e-6)
    torch.save({"model": {"not.a.retnet": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a torchscale RetNet"):
        convert(tmp_path / "other.pt", tmp_path / "out2", heads=2)


def test_decoding_state_does_not_grow_with_context():
    model = _model().float()
    sizes = []
    for length in (8, 64):
        ids = torch.randint(3, 259, (1, length))
        with torch.no_grad():
            out = model(ids, use_cache=True)
            out = model(ids[:, -1:], cache=output_cache(out), use_cache=True)
        cache = output_cache(out)
        assert isinstance(cache, RecurrentCache) and cache.get_seq_length() == length + 1
        sizes.append(sum(t.numel() for s in cache.states.values() for t in s.values()))
    assert sizes[0] == sizes[1]
    head_state = math.prod((1, 2, 16, 32 + 1))  # (B, H, Dk, Dv + normaliser channel)
    assert sizes[0] == 2 * head_state


@pytest.mark.parametrize("position_encoding", ["xpos", "none"])
@pytest.mark.parametrize("decay", ["fixed", "data_dependent"])
def test_prefix_then_tokens_equals_full_forward(position_encoding, decay):
    """Decoding token by token from a prefix gives the full forward's logits with every position option
    (the shared suite covers the default rotation)."""
    model = _model(position_encoding=position_encoding, decay=decay)
    model.config.retention_mode = "chunk"
    full, incremental, _ = full_and_incremental_logits(model, torch.randint(3, 259, (2, 23)), prefix=11)
    torch.testing.assert_close(incremental, full, rtol=1e-9, atol=1e-9)
