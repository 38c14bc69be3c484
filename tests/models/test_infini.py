"""Infini-attention (zoo_infini) against the paper's equations written out here, independently of the model's code:
per layer and segment, causal softmax attention inside the segment (rotary at absolute positions: only distances
matter), the memory read σ(Q) M / (σ(Q) z + eps) with σ = ELU + 1, the per-head gate, then the memory write (linear
or delta rule). Also: decoding and streaming in pieces equal one pass, the cache stays bounded by the segment, and
``from_baseline`` starts from the baseline transformer's function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.decoding import full_and_incremental_logits
from tests.models.tiny_configs import tiny_config
from zoo.models.infini import InfiniConfig, InfiniForCausalLM
from zoo.models.transformer import TransformerConfig, TransformerForCausalLM
from zoo.models.utils import output_cache

VOCAB_LO = 3


def tokens(batch, length, seed=0):
    return torch.randint(VOCAB_LO, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def model(**overrides):
    torch.manual_seed(0)
    overrides.setdefault("gate_init", 0.3)
    return InfiniForCausalLM(tiny_config("zoo_infini", **overrides)).eval()


def paper_logits(m: InfiniForCausalLM, ids: torch.Tensor, sd: dict | None = None) -> torch.Tensor:
    """The forward as the paper writes it, one segment after another, in float64; ``sd``: the weights by name
    (default: the model's, detached)."""
    cfg = m.config
    if sd is None:
        sd = {n: p.detach().double() for n, p in m.state_dict().items()}
    H, Hkv, D, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.segment_length
    eps = cfg.memory_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def sigma(x):
        return F.elu(x) + 1

    B, T = ids.shape
    theta = cfg.rope_parameters["rope_theta"]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, D/2) absolute positions
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rotate(x, pos):  # x (B, l, h, D)
        if cfg.position_embedding_type == "none":
            return x
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos[pos, None] + torch.cat([-x2, x1], -1) * sin[pos, None]

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, H, D)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, D).repeat_interleave(H // Hkv, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, D).repeat_interleave(H // Hkv, 2)
        beta = torch.sigmoid(sd[p + "self_attn.gate"])[:, None]  # (H, 1)
        M = torch.zeros(B, H, D, D, dtype=torch.float64)
        z = torch.zeros(B, H, D, dtype=torch.float64)
        outs = []
        for s in range(0, T, L):
            pos = torch.arange(s, min(s + L, T))
            Q, K, V = q[:, pos], k[:, pos], v[:, pos]
            # dot-product attention inside the segment
            scores = torch.einsum("blhd,bmhd->bhlm", rotate(Q, pos), rotate(K, pos)) / D**0.5
            causal = torch.ones(len(pos), len(pos), dtype=torch.bool).tril()
            A_dot = torch.einsum("bhlm,bmhd->blhd", scores.masked_fill(~causal, -torch.inf).softmax(-1), V)
            # memory read of the earlier segments
            sQ, sK = sigma(Q), sigma(K)
            A_mem = (
                torch.einsum("blhk,bhkv->blhv", sQ, M)
                / (torch.einsum("blhk,bhk->blh", sQ, z) + eps)[..., None]
            )
            outs.append(beta * A_mem + (1 - beta) * A_dot)
            # memory write
            if cfg.memory_update == "delta":
                retrieved = torch.einsum("blhk,bhkv->blhv", sK, M)
                retrieved = retrieved / (torch.einsum("blhk,bhk->blh", sK, z) + eps)[..., None]
                M = M + torch.einsum("blhk,blhv->bhkv", sK, V - retrieved)
            else:
                M = M + torch.einsum("blhk,blhv->bhkv", sK, V)
            z = z + sK.sum(1)
        attn = torch.cat(outs, 1).reshape(B, T, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + attn
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("T", [3, 11])
def test_model_equals_the_papers_equations(update, T):
    m = model(memory_update=update).double()
    assert {n for n, _ in m.named_parameters()} >= {"model.layers.0.self_attn.gate"}
    ids = tokens(2, T)
    with torch.no_grad():
        ours = m(ids, use_cache=False).logits
    expected = paper_logits(m, ids)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("positions", ["none", "rope"])
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_training_gradients_equal_the_papers_equations(update, positions):
    """Every parameter's gradient of a loss on every token (the training step: rows of equal length, segments
    batched, the memory op's written-out backward) against autograd through the paper's loop, at a length that is
    not a multiple of the segment. Without positions to 1e-9 elementwise; with rotary positions to 1e-6 of each
    gradient's largest entry, because the model's rotary angles are float32 (transformers' Llama rotary
    embedding), which moves float64 gradients by up to ~4e-8 of their scale, the naive op alike."""
    m = model(memory_update=update, position_embedding_type=positions).double().train()
    ids = tokens(2, 11)
    logits = m(ids, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (logits * weights).sum().backward()
    params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    expected = paper_logits(m, ids, params)
    (expected * weights).sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    for name, p in m.named_parameters():
        ref = params[name].grad
        assert ref is not None and ref.abs().max() > 0, name
        if positions == "none":
            torch.testing.assert_close(
                p.grad, ref, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}"
            )
        else:
            assert (p.grad - ref).abs().max() <= 1e-6 * ref.abs().max(), name


@pytest.mark.parametrize(
    "update,prefix,step", [("delta", 1, 1), ("linear", 6, 1), ("linear", 5, 3), ("delta", 2, 7)]
)
def test_decoding_and_streaming_in_pieces_equal_one_pass(update, prefix, step):
    """Prefix then pieces of ``step`` tokens with the cache (segments of 4: pieces end inside and across
    segments) equal the full forward."""
    m = model(memory_update=update)
    full, incremental, _ = full_and_incremental_logits(m, tokens(2, 13), prefix=prefix, step=step)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_long_prompt_with_cache_runs_in_segments_and_keeps_one_segment():
    """A prompt many segments long with the cache on equals the forward without it, and the cache then holds the
    memory and the keys of the unfinished segment only (3 of 4 tokens), whatever the prompt's length."""
    m = model()
    for T in (23, 47):
        ids = tokens(1, T, seed=T)
        with torch.no_grad():
            without = m(ids, use_cache=False).logits
            out = m(ids, use_cache=True)
        torch.testing.assert_close(out.logits, without, rtol=1e-5, atol=1e-5)
        layer = output_cache(out).get(0)
        assert layer["keys"].shape[1] == T % 4
        assert layer["state"].shape == (1, 4, 8, 9)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_aligned_cached_prefill_takes_the_equal_segments_route(update, monkeypatch):
    """A cached input whose segments all start at its first token (an empty cache, or one whose last segment is
    finished; no padding) runs without the packed layout: the memory of its finished segments through the
    equal-rows op from the cached memory, its unfinished last segment read from the memory after them and kept.
    Prompts that are not a multiple of the segment (4), then token-by-token decoding across two segment ends, or
    pieces that start inside and at segment ends, equal the full forward; the cache after the prefill holds the
    same memory and keys as the packed layout's."""
    from zoo.models.infini import modeling_infini

    m = model(memory_update=update)
    packed_calls = []
    original = modeling_infini.segment_layout
    monkeypatch.setattr(
        modeling_infini, "segment_layout", lambda *a, **kw: packed_calls.append(1) or original(*a, **kw)
    )
    ids = tokens(2, 21, seed=int(update == "delta"))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        for prefix in (3, 11):
            out = m(ids[:, :prefix], use_cache=True)
            assert not packed_calls, f"a prefill of {prefix} tokens took the packed layout"
            torch.testing.assert_close(out.logits, full[:, :prefix], rtol=1e-5, atol=1e-5)
            fast_cache = output_cache(out)
            assert fast_cache.get(0)["keys"].shape[1] == prefix % 4
            with monkeypatch.context() as forced:
                forced.setattr(
                    modeling_infini.InfiniModel, "_segments_start_here", staticmethod(lambda *a: False)
                )
                packed_cache = output_cache(m(ids[:, :prefix], use_cache=True))
            assert packed_calls
            for i in range(m.config.num_hidden_layers):
                for name, t in packed_cache.get(i).items():
                    torch.testing.assert_close(fast_cache.get(i)[name], t, rtol=1e-6, atol=1e-6)
            packed_calls.clear()
    # decoding one token at a time from an unaligned prefill, across the ends of segments 3 and 4
    _, incremental, _ = full_and_incremental_logits(m, ids[:, :19], prefix=11, step=1)
    torch.testing.assert_close(incremental, full[:, :19], rtol=1e-5, atol=1e-5)
    # pieces of 6: 5 + 6 (from inside a segment: its first piece completes it) + 6 + 4 (from a segment's start)
    _, incremental, _ = full_and_incremental_logits(m, ids, prefix=5, step=6)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_left_padded_generation_equals_one_by_one():
    """Rows of different lengths (left padding) fill their segments at different steps; each row's greedy
    continuation equals its own, unpadded."""
    m = model()
    seqs = [tokens(1, n, seed=i)[0] for i, n in enumerate([9, 3, 6])]
    T = 9
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :], mask[i, T - len(s) :] = s, 1
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    batched = m.generate(ids, attention_mask=mask, **kw)[:, T:]
    for i, s in enumerate(seqs):
        alone = m.generate(s[None], **kw)[0, len(s) :]
        torch.testing.assert_close(batched[i], alone, rtol=0, atol=0)


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    return TransformerForCausalLM(config).eval()


def test_from_baseline_equals_the_baseline_within_one_segment(baseline, tmp_path):
    ids = tokens(2, 16)
    with torch.no_grad():
        expected = baseline(ids).logits
        # the default gate (sigmoid(-10) = 4.5e-5 of an empty memory's zero read): the baseline up to that factor
        m = InfiniForCausalLM.from_baseline(baseline).eval()
        assert m.config.segment_length == 16 and m.config.model_type == "zoo_infini"
        torch.testing.assert_close(m(ids).logits, expected, rtol=1e-4, atol=1e-4)
        # a gate closed to float precision: the baseline's logits exactly, from a saved checkpoint
        baseline.save_pretrained(tmp_path)
        closed = InfiniForCausalLM.from_baseline(tmp_path, gate_init=-40.0).eval()
        torch.testing.assert_close(closed(ids).logits, expected, rtol=1e-6, atol=1e-6)
        # longer inputs read the memory: no longer the baseline
        long_ids = tokens(1, 40)
        closed_long = InfiniForCausalLM.from_baseline(baseline, gate_init=-40.0, segment_length=8).eval()
        assert not torch.allclose(closed_long(long_ids).logits, baseline(long_ids).logits, atol=1e-3)


def test_from_baseline_refuses_other_models():
    with pytest.raises(ValueError, match="zoo_transformer"):
        InfiniForCausalLM.from_baseline(model())


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="memory_update"):
        InfiniConfig(memory_update="hebbian")
    with pytest.raises(ValueError, match="segment_length"):
        InfiniConfig(segment_length=0)
