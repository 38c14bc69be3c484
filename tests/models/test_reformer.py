"""Reformer: parity with transformers' ReformerModelWithLMHead and ReformerForMaskedLM through ``python -m
zoo.convert`` (hashed LSH chunks, local chunks, padding, an unset bucket count), the reversible backward against
ordinary autograd, and decoding with the cache against the full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import ReformerConfig, ReformerForMaskedLM, ReformerModelWithLMHead

from tests.models.decoding import full_and_incremental_logits
from zoo.convert import convert
from zoo.models.reformer import ZooReformerConfig, ZooReformerForCausalLM
from zoo.models.utils import CACHE_NAME, output_cache


def hf_config(**overrides):
    """Two local layers (chunks of 4) and two LSH layers (chunks of 8, 2 rounds), axial positions."""
    base = dict(
        vocab_size=50,
        hidden_size=16,
        num_attention_heads=2,
        attention_head_size=8,
        attn_layers=["local", "lsh", "local", "lsh"],
        feed_forward_size=32,
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=8,
        num_hashes=2,
        num_buckets=4,
        hash_seed=3,
        axial_pos_shape=[4, 8],
        axial_pos_embds_dim=[4, 12],
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        eos_token_id=2,
    )
    return ReformerConfig(**{**base, **overrides})


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=["causal", "mlm"])
def converted(request, tmp_path_factory):
    """A transformers Reformer saved to disk and converted by ``python -m zoo.convert``'s entry point."""
    torch.manual_seed(0)
    causal = request.param == "causal"
    cls = ReformerModelWithLMHead if causal else ReformerForMaskedLM
    hf = cls(hf_config(is_decoder=causal, lsh_num_chunks_after=0 if causal else 1)).eval()
    src, dst = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("zoo")
    hf.save_pretrained(src)
    return hf, convert(src, dst).eval()


def test_logits_equal_transformers(converted):
    hf, zoo_model = converted
    ids = torch.randint(
        3, 50, (2, 29), generator=torch.Generator().manual_seed(1)
    )  # padded to 32: 4 LSH chunks
    with torch.no_grad():
        assert rel(zoo_model(ids).logits, hf(ids).logits) < 1e-5
        # padding: a right-padded row (real positions compared; padding queries are not outputs)
        mask = torch.ones_like(ids)
        mask[1, -9:] = 0
        real = mask.bool()
        assert (
            rel(zoo_model(ids, attention_mask=mask).logits[real], hf(ids, attention_mask=mask).logits[real])
            < 1e-5
        )
        short = ids[:, :6]  # one chunk: plain attention
        assert rel(zoo_model(short).logits, hf(short).logits) < 1e-5


def test_unset_bucket_count_is_chosen_from_the_first_long_input():
    torch.manual_seed(0)
    hf = ReformerModelWithLMHead(hf_config(is_decoder=True, num_buckets=None)).eval()
    from zoo.models.reformer.convert_reformer import from_transformers

    zoo_model = from_transformers(hf)
    assert zoo_model.config.num_buckets is None and zoo_model.config.transformers_compat
    ids = torch.randint(3, 50, (1, 32), generator=torch.Generator().manual_seed(2))
    state = torch.random.get_rng_state()
    with torch.no_grad():
        got = zoo_model(ids).logits
    assert torch.equal(torch.random.get_rng_state(), state), "hashing used the global random state"
    with torch.no_grad():
        expected = hf(ids).logits
    assert zoo_model.config.num_buckets == hf.config.num_buckets == 8
    assert rel(got, expected) < 1e-5


def zoo_causal(**overrides):
    base = dict(
        vocab_size=50,
        hidden_size=16,
        num_attention_heads=2,
        attention_head_size=8,
        attn_layers=["local", "lsh"],
        feed_forward_size=32,
        chunk_size_feed_forward=3,
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=8,
        num_hashes=2,
        num_buckets=4,
        axial_pos_shape=[4, 8],
        axial_pos_embds_dim=[4, 12],
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return ZooReformerForCausalLM(ZooReformerConfig(**{**base, **overrides}))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reversible_backward_equals_ordinary_backward(dropout):
    """Hashed LSH chunks (32 tokens, chunks of 8) and local chunks; with dropout the recomputation must repeat
    the forward's masks."""
    ids = torch.randint(3, 50, (2, 32), generator=torch.Generator().manual_seed(3))
    grads = []
    for reversible in (True, False):
        model = zoo_causal(reversible=reversible, hidden_dropout_prob=dropout).train()
        torch.manual_seed(5)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None for g in grads[0].values())
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6, msg=name)


def _context_tensors(loss: torch.Tensor) -> list[torch.Tensor]:
    """Distinct tensors kept as attributes of custom autograd Functions' contexts in the graph of ``loss`` (the
    saved-tensor hooks see only ``save_for_backward``)."""
    found, seen, stack = {}, set(), [loss.grad_fn]

    def collect(x):
        if isinstance(x, torch.Tensor):
            found[x.untyped_storage().data_ptr()] = x
        elif isinstance(x, (list, tuple)):
            for y in x:
                collect(y)
        elif isinstance(x, dict):
            collect(list(x.values()))

    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        collect(list(getattr(node, "__dict__", {}).values()))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


def test_reversible_training_memory_does_not_grow_with_depth():
    """What a training forward keeps for the backward, at 2 and 6 layers (local + LSH, 2 hash rounds): the bytes
    autograd saves (``bench.memprobe.saved_for_backward_bytes``, parameters excluded) are the same with reversible
    layers and grow by at least one (B, T, hidden) float32 tensor per added layer without. Beside them the
    reversible Function holds, per layer, only integers: the random states that replay dropout and the LSH
    layers' buckets (B, H, rounds, T), no activations."""
    from bench.memprobe import saved_for_backward_bytes

    B, T, C, H, n = 2, 32, 16, 2, 2
    ids = torch.randint(3, 50, (B, T), generator=torch.Generator().manual_seed(7))
    saved, held = {}, {}
    for reversible in (True, False):
        for layers in (2, 6):
            model = zoo_causal(reversible=reversible, attn_layers=["local", "lsh"] * (layers // 2)).train()
            saved[reversible, layers] = saved_for_backward_bytes(model, ids)
            if reversible:
                held[layers] = _context_tensors(model(ids, labels=ids).loss)
    assert saved[True, 6] == saved[True, 2] > 0
    assert saved[False, 6] - saved[False, 2] >= 4 * B * T * C * 4
    for layers, tensors in held.items():
        assert not any(t.is_floating_point() for t in tensors), f"{layers} layers: an activation is held"
    nbytes = {layers: sum(t.untyped_storage().nbytes() for t in tensors) for layers, tensors in held.items()}
    rng_state = torch.get_rng_state().numel()
    assert nbytes[6] - nbytes[2] <= 4 * 2 * rng_state + 2 * B * H * n * T * 8


def test_prefix_then_token_by_token_equals_full_forward():
    """Local chunks of 4 crossed while decoding (the cache's window rule); LSH layers within one chunk of 32."""
    model = zoo_causal(attn_layers=["local", "lsh", "local"], lsh_attn_chunk_length=32).eval()
    ids = torch.randint(3, 50, (2, 21), generator=torch.Generator().manual_seed(4))
    full, incremental, _ = full_and_incremental_logits(model, ids, prefix=6)
    assert rel(incremental, full) < 1e-5


def test_lsh_decoding_equals_the_forward_of_each_prefix():
    """Past one chunk, a new token's hashed neighbours depend on the tokens before it only as a forward over that
    prefix sees them (in the full forward, later tokens also take places in the sorted chunks): with local and LSH
    layers (2 rounds, chunks of 4, hashed from 5 tokens on) and a left-padded row, each decoded token's logits
    equal the last ones of the forward over its prefix, which is what generation without a cache computes."""
    model = zoo_causal(attn_layers=["local", "lsh"], lsh_attn_chunk_length=4).eval()
    ids = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    prefix = 3
    with torch.no_grad():
        out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
        cache, steps = output_cache(out), [out.logits[:, -1:]]
        for t in range(prefix, ids.shape[1]):
            out = model(
                ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **{CACHE_NAME: cache}
            )
            cache = output_cache(out)
            steps.append(out.logits)
        per_prefix = [
            model(ids[:, : t + 1], attention_mask=mask[:, : t + 1]).logits[:, -1:]
            for t in range(prefix - 1, ids.shape[1])
        ]
    assert rel(torch.cat(steps, dim=1), torch.cat(per_prefix, dim=1)) < 1e-5


def test_generation_with_and_without_cache_agree():
    """Greedy generation past several LSH chunks gives the same tokens with the cache as without it."""
    model = zoo_causal(attn_layers=["local", "lsh"], lsh_attn_chunk_length=4).eval()
    prompt = torch.randint(3, 50, (1, 5), generator=torch.Generator().manual_seed(8))
    kwargs = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == 19 and torch.equal(cached, uncached)


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="attn_layers"):
        ZooReformerConfig(attn_layers=["lsh", "global"])
    with pytest.raises(ValueError, match="num_buckets"):
        ZooReformerConfig(attn_layers="lsh", num_buckets=5)
    with pytest.raises(ValueError, match="lsh_num_chunks_after"):
        ZooReformerConfig(attn_layers="lsh", is_decoder=True, lsh_num_chunks_after=1, num_buckets=4)
