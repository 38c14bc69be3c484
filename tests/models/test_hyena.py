"""Hyena (zoo_hyena): the operator and the language model against the reference's equations written out here, on
weights in the reference's (safari's) names; the positional features and decay window against their formulas;
the grid's extension; and the distilled recurrences (fit error, and decoding with them against the full forward).

The reference below is an independent implementation of safari's ``HyenaOperator`` forward (Poli et al., 2023,
arXiv:2302.10866): dense projections, the short causal convolution as an explicit sum, the filter network, the
``(v o)`` channel layout, and each long convolution as the direct sum over taps (not zoo's ops).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models.tiny_configs import tiny_config
from zoo.models.hyena import HyenaConfig, HyenaForCausalLM
from zoo.models.hyena.convert_hyena import from_safari, operator_from_safari
from zoo.models.utils import output_cache


def safari_operator_weights(d, l_max, order, filter_order, emb_dim, inner=2, short=3, seed=0):
    """A safari ``HyenaOperator`` state dict with random weights (sizes as its constructor makes them)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    d_filter = d * (order - 1)
    bands = (emb_dim - 1) // 2
    t = torch.linspace(0, 1, l_max)[None, :, None]
    angle = (
        torch.linspace(1e-4, bands - 1, bands)[None, None]
        * (2 * math.pi * torch.arange(l_max) / l_max)[None, :, None]
    )
    sd = {
        "in_proj.weight": randn((order + 1) * d, d, scale=d**-0.5),
        "in_proj.bias": randn((order + 1) * d, scale=0.1),
        "out_proj.weight": randn(d, d, scale=d**-0.5),
        "out_proj.bias": randn(d, scale=0.1),
        "short_filter.weight": randn((order + 1) * d, 1, short, scale=0.5),
        "short_filter.bias": randn((order + 1) * d, scale=0.1),
        "filter_fn.bias": randn(d_filter),
        "filter_fn.pos_emb.z": torch.cat([t, torch.cos(angle), -torch.sin(angle)], -1) + randn(1, l_max, emb_dim, scale=0.01),
        "filter_fn.pos_emb.t": t,
        "filter_fn.implicit_filter.0.weight": randn(filter_order, emb_dim),
        "filter_fn.implicit_filter.0.bias": randn(filter_order),
        "filter_fn.modulation.deltas": torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d_filter)[None, None],
    }  # fmt: skip
    freq = 1.0 + randn(1, filter_order, scale=0.3)
    for i in range(inner + 1):
        sd[f"filter_fn.implicit_filter.{2 * i + 1}.freq"] = freq  # one shared Sin at every odd index
    for i in range(inner):
        sd[f"filter_fn.implicit_filter.{2 * i + 2}.weight"] = randn(
            filter_order, filter_order, scale=filter_order**-0.5
        )
        sd[f"filter_fn.implicit_filter.{2 * i + 2}.bias"] = randn(filter_order, scale=0.1)
    sd[f"filter_fn.implicit_filter.{2 * inner + 2}.weight"] = randn(d_filter, filter_order, scale=0.3)
    return sd


def reference_filter(sd, L, inner, shift=0.0, normalized=False):
    """The implicit filters (L, d_filter): sine network over the positional features (with ``normalized``, each
    position divided by its L1 norm over the channels), times the decay window."""
    z, t = sd["filter_fn.pos_emb.z"][0, :L].double(), sd["filter_fn.pos_emb.t"][0, :L].double()
    freq = sd["filter_fn.implicit_filter.1.freq"].double()
    a = z
    for i in range(inner + 1):
        w, b = (
            sd[f"filter_fn.implicit_filter.{2 * i}.weight"].double(),
            sd[f"filter_fn.implicit_filter.{2 * i}.bias"],
        )
        a = torch.sin(freq * (a @ w.T + b.double()))
    k = a @ sd[f"filter_fn.implicit_filter.{2 * inner + 2}.weight"].double().T
    if normalized:
        k = k / k.abs().sum(-1, keepdim=True)
    return k * (torch.exp(-t * sd["filter_fn.modulation.deltas"][0].double().abs()) + shift)


def reference_operator(sd, u, order, inner=2, normalized=False):
    """safari's HyenaOperator forward on u (B, L, d), in float64."""
    B, L, d = u.shape
    u = u.double()
    p = u @ sd["in_proj.weight"].double().T + sd["in_proj.bias"].double()  # (B, L, (order + 1) d)
    w, bias = sd["short_filter.weight"].double()[:, 0], sd["short_filter.bias"].double()  # (C, K)
    K = w.shape[1]
    padded = F.pad(p, (0, 0, K - 1, 0))
    uc = bias + sum(w[:, k] * padded[:, k : k + L] for k in range(K))  # tap K - 1 meets the current token
    x = list(uc.split(d, dim=-1))
    v = x.pop()
    k = reference_filter(sd, L, inner, normalized=normalized)  # (L, d (order - 1)); channel c = i (order - 1) + o
    skip = sd["filter_fn.bias"].double()
    for o, x_i in enumerate(reversed(x[1:])):
        v = v * x_i
        k_o, D_o = k[:, o :: order - 1], skip[o :: order - 1]  # (L, d), (d,)
        y = torch.stack([sum(k_o[s] * v[:, t - s] for s in range(t + 1)) for t in range(L)], 1)
        v = y + D_o * v
    y = v * x[0]
    return y @ sd["out_proj.weight"].double().T + sd["out_proj.bias"].double()


@pytest.mark.parametrize(("order", "emb_dim", "L"), [(2, 3, 12), (3, 5, 16), (4, 3, 9)])
def test_operator_from_safari_equals_the_reference(order, emb_dim, L):
    d, l_max, filter_order = 6, 16, 8
    sd = safari_operator_weights(d, l_max, order, filter_order, emb_dim, seed=order)
    op = operator_from_safari(
        sd, d_model=d, l_max=l_max, order=order, filter_order=filter_order, emb_dim=emb_dim
    )
    u = torch.randn(2, L, d)
    torch.testing.assert_close(op(u).double(), reference_operator(sd, u, order), rtol=1e-4, atol=1e-5)


def test_normalized_filters_are_normalized_before_the_decay_window():
    """safari's ``normalized=True``: h / ||h||_1 over the channels, then the window; the other order would divide
    most of the window's decay over time back out."""
    d, l_max, order, filter_order, L = 6, 16, 3, 8, 14
    sd = safari_operator_weights(d, l_max, order, filter_order, 5, seed=7)
    op = operator_from_safari(
        sd, d_model=d, l_max=l_max, order=order, filter_order=filter_order, emb_dim=5, normalized=True
    )
    u = torch.randn(2, L, d)
    torch.testing.assert_close(
        op(u).double(), reference_operator(sd, u, order, normalized=True), rtol=1e-4, atol=1e-5
    )


def test_operator_options_outside_zoo_are_errors():
    sd = safari_operator_weights(4, 8, 2, 8, 3)
    with pytest.raises(ValueError, match="num_heads=2 is not supported"):
        operator_from_safari(sd, d_model=4, l_max=8, filter_order=8, num_heads=2)
    with pytest.raises(ValueError, match="needs l_max="):
        operator_from_safari(sd, d_model=4)
    with pytest.raises(ValueError, match="unknown safari HyenaOperator option 'ordr'"):
        operator_from_safari(sd, d_model=4, l_max=8, ordr=2)
    sd["filter_fn.implicit_filter.3.freq"] = sd["filter_fn.implicit_filter.3.freq"] + 1
    with pytest.raises(ValueError, match="sine frequency differs"):
        operator_from_safari(sd, d_model=4, l_max=8, filter_order=8)


def safari_lm_weights(vocab=11, d=6, layers=2, d_inner=12, l_max=16, order=3):
    gen = torch.Generator().manual_seed(7)
    sd = {"backbone.embeddings.word_embeddings.weight": torch.randn(vocab, d, generator=gen)}
    for i in range(layers):
        p = f"backbone.layers.{i}."
        for name, value in safari_operator_weights(d, l_max, order, 8, 5, seed=10 + i).items():
            sd[p + "mixer." + name] = value
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = 1 + 0.1 * torch.randn(d, generator=gen)
            sd[p + norm + ".bias"] = 0.1 * torch.randn(d, generator=gen)
        sd[p + "mlp.fc1.weight"] = torch.randn(d_inner, d, generator=gen) * d**-0.5
        sd[p + "mlp.fc1.bias"] = 0.1 * torch.randn(d_inner, generator=gen)
        sd[p + "mlp.fc2.weight"] = torch.randn(d, d_inner, generator=gen) * d_inner**-0.5
        sd[p + "mlp.fc2.bias"] = 0.1 * torch.randn(d, generator=gen)
    sd["backbone.ln_f.weight"], sd["backbone.ln_f.bias"] = torch.ones(d), torch.zeros(d)
    sd["lm_head.weight"] = sd["backbone.embeddings.word_embeddings.weight"]
    return sd


def reference_lm(sd, ids, layers=2, order=3):
    """safari's ConvLMHeadModel: pre-norm blocks (LayerNorm, Hyena; LayerNorm, tanh-GELU MLP), ln_f, tied head."""
    emb = sd["backbone.embeddings.word_embeddings.weight"].double()
    x = emb[ids]

    def ln(h, name):
        return F.layer_norm(h, h.shape[-1:], sd[name + ".weight"].double(), sd[name + ".bias"].double(), 1e-5)

    for i in range(layers):
        p = f"backbone.layers.{i}."
        mixer = {k[len(p + "mixer.") :]: v for k, v in sd.items() if k.startswith(p + "mixer.")}
        x = x + reference_operator(mixer, ln(x, p + "norm1"), order)
        h = ln(x, p + "norm2") @ sd[p + "mlp.fc1.weight"].double().T + sd[p + "mlp.fc1.bias"].double()
        h = (
            F.gelu(h, approximate="tanh") @ sd[p + "mlp.fc2.weight"].double().T
            + sd[p + "mlp.fc2.bias"].double()
        )
        x = x + h
    return ln(x, "backbone.ln_f") @ emb.T


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A safari LM checkpoint (under HyenaDNA's Lightning ``model.`` prefix) converted by ``python -m zoo.convert``."""
    from zoo.convert import convert

    sd = safari_lm_weights()
    path = tmp_path_factory.mktemp("hyena") / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, path)
    dst = path.parent / "zoo"
    convert(path, dst)
    return sd, HyenaForCausalLM.from_pretrained(dst).eval()


def test_safari_lm_converts_with_equal_logits(converted):
    sd, model = converted
    assert model.config.order == 3 and model.config.emb_dim == 5 and model.config.intermediate_size == 12
    ids = torch.randint(0, 11, (2, 13))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits.double(), reference_lm(sd, ids), rtol=1e-4, atol=1e-4)
    # the same model straight from the state dict
    direct = from_safari(sd).eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(ids, use_cache=False).logits, logits)


def test_initialisation_follows_the_reference_formulas():
    """z = [t, Re exp(-i f w), Im exp(-i f w)] with t = linspace(0, 1, l_max), w = 2 pi j / l_max, f =
    linspace(1e-4, bands - 1, bands); deltas = linspace(log(target) / slow, log(target) / fast, channels)."""
    cfg = HyenaConfig(hidden_size=4, num_hidden_layers=1, order=3, emb_dim=7, max_position_embeddings=10)
    filt = HyenaForCausalLM(cfg).model.layers[0].mixer.filter_fn
    j = torch.arange(10.0)[:, None]
    f = torch.linspace(1e-4, 2, 3)
    expected = torch.cat(
        [j / 9, torch.cos(f * 2 * math.pi * j / 10), -torch.sin(f * 2 * math.pi * j / 10)], -1
    )
    torch.testing.assert_close(filt.pos_emb.z[0], expected)
    torch.testing.assert_close(
        filt.modulation.deltas.flatten(), torch.linspace(math.log(0.01) / 1.5, math.log(0.01) / 0.3, 8)
    )
    assert filt.implicit_filter._modules["1"].freq.eq(1.0).all() and filt.bias.shape == (8,)


def test_longer_than_the_grid_extends_the_features_or_is_an_error():
    """Past max_position_embeddings: the features continue by their formula (a prefix sees the same filter), or a
    ValueError with filter_extension="error"; never a silent cut."""
    model = HyenaForCausalLM(tiny_config("zoo_hyena")).eval()  # grid of 16
    filt = model.model.layers[0].mixer.filter_fn
    z, t = filt.pos_emb(24)
    j = torch.arange(16.0, 24.0)[:, None]
    f = torch.linspace(1e-4, 1, 2)
    expected = torch.cat(
        [j / 15, torch.cos(f * 2 * math.pi * j / 16), -torch.sin(f * 2 * math.pi * j / 16)], -1
    )
    torch.testing.assert_close(z[0, 16:], expected)
    torch.testing.assert_close(t[0, 16:, 0], j[:, 0] / 15)
    ids = torch.randint(0, 259, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :20], model(ids[:, :20]).logits, rtol=1e-5, atol=1e-5)
    strict = HyenaForCausalLM(tiny_config("zoo_hyena", filter_extension="error")).eval()
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        strict(ids)


def test_distilled_recurrence_fits_and_decodes_close_to_the_full_forward():
    """A tiny model trained for a few steps, distilled into 8 complex modes per channel: each layer's fit error is
    small, and decoding with the fixed-size state matches the exact full forward to within that error."""
    torch.manual_seed(0)
    model = HyenaForCausalLM(tiny_config("zoo_hyena", max_position_embeddings=48))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.randint(3, 40, (4, 48))
    for _ in range(10):
        opt.zero_grad()
        model(data, labels=data, use_cache=False).loss.backward()
        opt.step()
    model.eval()
    errors = model.distill_recurrence(8)
    assert len(errors) == 2 and max(errors) < 1e-3, errors
    ids = torch.randint(3, 40, (2, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        pieces, cache = [out.logits], output_cache(out)
        for t in range(6, 40):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
            cache = output_cache(out)
    state = cache.get(0)["ssm"]
    assert state.shape == (2, 2, 16, 8) and "history" not in cache.get(0)  # fixed size: O(1) per token
    rel = (torch.cat(pieces, 1) - full).norm() / full.norm()
    assert rel < 10 * max(errors) + 1e-5, (rel, errors)
    model.undistill_recurrence()
    with torch.no_grad():
        assert "history" in output_cache(model(ids[:, :3], use_cache=True)).get(0)


def test_fit_modes_recovers_exact_modes_in_batches(monkeypatch):
    """Sequences that are exactly sums of 6 damped oscillations: the randomized leading subspace finds their
    poles and residues (fit error at rounding), and forming the Hankel matrices a few sequences at a time
    (``FIT_BATCH_BYTES`` made small) gives the same modes as all at once."""
    from zoo.models.hyena import modeling_hyena

    gen = torch.Generator().manual_seed(0)
    radius = 0.80 + 0.15 * torch.rand(5, 3, generator=gen, dtype=torch.float64)
    angle = math.pi * torch.rand(5, 3, generator=gen, dtype=torch.float64)
    poles = torch.polar(radius, angle)  # 3 conjugate pairs: 6 real modes per sequence
    weights = torch.randn(5, 3, generator=gen, dtype=torch.complex128)
    j = torch.arange(200, dtype=torch.float64)
    g = 2 * (weights[:, :, None] * poles[:, :, None] ** j).real.sum(1)  # (5, 200)
    A, R = modeling_hyena.fit_modes(g, 6)
    fit = (R[:, None, :] * A[:, None, :] ** j[:, None]).sum(-1).real
    assert ((fit - g).norm(dim=-1) / g.norm(dim=-1)).max() < 1e-8
    found = torch.sort(A.abs(), dim=-1).values
    expected = torch.sort(torch.cat([radius, radius], -1), dim=-1).values
    assert (found - expected).abs().max() < 1e-8
    monkeypatch.setattr(modeling_hyena, "FIT_BATCH_BYTES", 2 * 100 * 101 * 8)  # two sequences per batch
    A2, R2 = modeling_hyena.fit_modes(g, 6)
    fit2 = (R2[:, None, :] * A2[:, None, :] ** j[:, None]).sum(-1).real
    assert (fit2 - fit).abs().max() < 1e-9 * g.abs().max()
