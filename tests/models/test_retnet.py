"""RetNet: the three retention modes agree, the torchscale layout maps in, decoding is O(1) in the context."""

import math
import re
import shlex
from pathlib import Path

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


TORCHSCALE_ACTIVATIONS = {
    "swish": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.nn.functional.relu,
}


def _torchscale_reference(sd, heads, ids, activation="swish", scale_embedding=False, xpos_base=None):
    """An independent, literal rendering of torchscale's RetNet decoder in parallel mode, on torchscale names.

    Widths are read off the weights. ``activation`` is the feed-forward's ``activation_fn``; the retention output
    gate is always swish (torchscale's ``gate_fn``, never passed by its decoder). With ``xpos_base``, q and k are also scaled the xPos way after the rotation (Sun et al. 2022): channel pair i
    by zeta_i ** (n / base) in q and zeta_i ** (-n / base) in k, zeta_i = (2i + 0.4 dk) / (1.4 dk)."""
    H, C = heads, sd["embed_tokens.weight"].shape[1]
    dk, dv = C // H, sd["layers.0.retention.v_proj.weight"].shape[0] // H
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
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

    x = sd["embed_tokens.weight"][ids] * (C**0.5 if scale_embedding else 1.0)
    for i in range(layers):
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
        act = TORCHSCALE_ACTIVATIONS[activation]
        ffn = act(h @ sd[p + "ffn.fc1.weight"].T) * (h @ sd[p + "ffn.gate.weight"].T)
        x = x + ffn @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["layer_norm.weight"]) @ sd["output_projection.weight"].T


def _torchscale_state_dict(config):
    """Random weights in torchscale's names, rounded to float32 and held in float64 (a checkpoint in float32 then
    loads into a float64 model exactly)."""
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
    return {k: v.float().double() for k, v in sd.items()}


@pytest.mark.parametrize("xpos", [False, True])
def test_torchscale_layout_maps_by_renaming(xpos):
    config = RetNetConfig(**SIZES)
    sd = _torchscale_state_dict(config)
    assert set(torchscale_to_zoo(sd)) == {k for k in RetNetForCausalLM(config).state_dict()}
    extra = dict(position_encoding="xpos", xpos_scale_base=16.0) if xpos else {}
    model = (
        from_torchscale(
            {"decoder." + k: v for k, v in sd.items()},
            num_heads=2,
            activation="swish",
            chunk_size=8,
            **extra,
        )
        .double()
        .eval()
    )
    ids = torch.randint(3, 259, (1, 19))
    expected = _torchscale_reference(sd, 2, ids, xpos_base=16.0 if xpos else None)
    for mode in ("parallel", "chunk", "recurrent"):
        torch.testing.assert_close(_logits(model, ids, mode), expected, rtol=1e-9, atol=1e-9)


# torchscale's own RetNetConfig defaults (gelu feed-forward, value width 1280/768 = 5/3 of the model width) and
# fairseq's retnet_base (swish feed-forward, value width 864/512 = 27/16), at tiny widths
TORCHSCALE_SETUPS = {
    "torchscale_default": dict(hidden=48, value_dim=80, activation="gelu", scale_embedding=False),
    "retnet_base": dict(hidden=512, value_dim=864, activation="swish", scale_embedding=True),
}
README = Path(__file__).resolve().parents[2] / "README.md"


def _torchscale_checkpoint(setup, tmp_path, store_options):
    s = TORCHSCALE_SETUPS[setup]
    sizes = {**SIZES, "hidden_size": s["hidden"], "value_dim": s["value_dim"]}
    sd = _torchscale_state_dict(RetNetConfig(**sizes))
    blob = {"model": {"decoder." + k: v.float() for k, v in sd.items()}}
    if store_options:  # what fairseq stores: its dataclass config under cfg["model"]
        blob["cfg"] = {
            "model": {
                "decoder_embed_dim": s["hidden"],
                "decoder_value_embed_dim": s["value_dim"],
                "decoder_ffn_embed_dim": SIZES["intermediate_size"],
                "decoder_layers": SIZES["num_hidden_layers"],
                "decoder_retention_heads": 2,
                "activation_fn": s["activation"],
                "no_scale_embedding": not s["scale_embedding"],
                "layernorm_eps": 1e-6,
                "decoder_normalize_before": True,
                "deepnorm": False,
            }
        }
    path = tmp_path / f"{setup}.pt"
    torch.save(blob, path)
    return path, sd, s


def _cli(*args):
    """``python -m zoo.convert ARGS`` exactly as the README writes it, in a fresh interpreter."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "zoo.convert", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("setup", sorted(TORCHSCALE_SETUPS))
def test_torchscale_checkpoints_convert_through_the_cli(setup, tmp_path):
    """Both torchscale configurations, converted by the documented command lines, give the literal rendering's
    logits: with the options stored in the checkpoint, and given as flags for a bare state dict in a fresh
    interpreter (for ``retnet_base``, the README's command line verbatim); converting back writes torchscale's
    layout and options."""
    from transformers import AutoModelForCausalLM

    from zoo.convert import main

    ids = torch.randint(3, 259, (1, 17))
    stored, sd, s = _torchscale_checkpoint(setup, tmp_path, store_options=True)
    expected = _torchscale_reference(
        sd, 2, ids, activation=s["activation"], scale_embedding=s["scale_embedding"]
    )
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(stored)["model"], bare)
    assert main([str(stored), str(tmp_path / "from_cfg")]) == 0
    if setup == "retnet_base":  # the README's command line, verbatim, in a fresh interpreter
        line = re.search(r"`(python -m zoo\.convert CHECKPOINT\.pt OUT --heads[^`]*)`", README.read_text())
        args = shlex.split(line.group(1))[3:]
        args = [{"CHECKPOINT.pt": str(bare), "OUT": str(tmp_path / "from_flags")}.get(a, a) for a in args]
        result = _cli(*args)
        assert result.returncode == 0, result.stderr
    else:
        flags = ["--heads", "2", "--activation", s["activation"], "--value-dim", str(s["value_dim"])]
        result = _cli(bare, tmp_path / "from_flags", *flags)
        assert result.returncode == 0, result.stderr
    for out in ("from_cfg", "from_flags"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / out).double().eval()
        assert model.config.hidden_act == {"swish": "silu"}.get(s["activation"], s["activation"])
        assert model.config.retention_gate_act == "silu" and model.config.value_dim == s["value_dim"]
        for mode in ("parallel", "chunk"):
            torch.testing.assert_close(_logits(model, ids, mode), expected, rtol=1e-9, atol=1e-9)

    assert main([str(tmp_path / "from_cfg"), str(tmp_path / "back.pt")]) == 0
    back, original = torch.load(tmp_path / "back.pt"), torch.load(stored)
    assert back["model"].keys() == original["model"].keys()
    for key, value in original["model"].items():
        assert torch.equal(back["model"][key], value), key
    for name, value in original["cfg"]["model"].items():
        assert back["cfg"]["model"][name] == value, name


def test_torchscale_options_that_disagree_or_are_missing_are_errors(tmp_path, capsys):
    from zoo.convert import convert, main

    stored, sd, s = _torchscale_checkpoint("retnet_base", tmp_path, store_options=True)
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match="--heads .decoder_retention_heads=4. disagrees with the checkpoint's"
    ):
        convert(stored, out, heads=4)
    with pytest.raises(ValueError, match="--activation .activation_fn='gelu'. disagrees"):
        convert(stored, out, activation="gelu")
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(stored)["model"], bare)
    with pytest.raises(ValueError, match="give --heads"):
        convert(bare, out)
    with pytest.raises(
        ValueError, match="decoder_value_embed_dim=1024 .the options. but the weights have 864"
    ):
        convert(bare, out, heads=2, value_factor=2)
    blob = torch.load(stored)
    blob["cfg"]["model"]["deepnorm"] = True
    torch.save(blob, tmp_path / "deepnorm.pt")
    with pytest.raises(ValueError, match="deepnorm=True, which zoo's RetNet does not implement"):
        convert(tmp_path / "deepnorm.pt", out)
    blob["cfg"]["model"]["deepnorm"] = False
    blob["model"]["decoder.layernorm_embedding.weight"] = torch.ones(512)
    torch.save(blob, tmp_path / "embnorm.pt")
    with pytest.raises(ValueError, match="layernorm_embedding"):
        convert(tmp_path / "embnorm.pt", out)
    # the command line says the same, and writes nothing
    with pytest.raises(SystemExit):
        main([str(bare), str(out)])
    assert "give --heads" in capsys.readouterr().err
    assert not out.exists()


def test_value_width_and_activations_are_separate_fields():
    config = RetNetConfig(**SIZES, value_dim=54, hidden_act="gelu")
    assert config.value_factor is None and config.retention_gate_act == "silu"
    assert RetNetConfig(**SIZES, value_factor=3).value_dim == 96
    assert RetNetConfig(**SIZES).value_dim == 64 and RetNetConfig(**SIZES).value_factor == 2
    with pytest.raises(ValueError, match="value_dim=54 and value_factor=2 disagree"):
        RetNetConfig(**SIZES, value_dim=54, value_factor=2)
    with pytest.raises(ValueError, match="value_dim=.*multiple of num_attention_heads"):
        RetNetConfig(**SIZES, value_dim=55)
    # the gate activation is its own: changing it changes the output, changing the FFN's too
    ids = torch.randint(3, 259, (1, 9))
    base = _logits(_model(), ids, "parallel")
    assert not torch.allclose(_logits(_model(retention_gate_act="gelu"), ids, "parallel"), base)
    assert not torch.allclose(_logits(_model(hidden_act="gelu"), ids, "parallel"), base)


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
