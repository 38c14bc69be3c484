"""Infini-attention's streaming prefill (Munkhdalai et al., 2024, arXiv:2404.07143): with the cache, a long input
runs in pieces of one segment, and with ``logits_to_keep`` only the kept positions outlive their piece. Checked
here: the kept logits equal the full forward's (no cache, one pass), and nothing the model holds or computes grows
with the input's length (the cache's tensors, and the largest output of any module, are the same after 3 and after
9 segments). Sizes and shapes only: no memory timing."""

from __future__ import annotations

import pytest
import torch

from tests.models.tiny_configs import tiny_config
from zoo.models.infini import InfiniForCausalLM
from zoo.models.utils import CACHE_NAME, output_cache

L = 4  # the tiny config's segment length


def tokens(batch, length, seed=0):
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = InfiniForCausalLM(tiny_config("zoo_infini", gate_init=0.3)).eval()
    assert m.config.segment_length == L
    return m


@pytest.fixture(scope="module")
def ids_and_full(model):
    ids = tokens(2, 6 * L + 3)  # six segments and an unfinished seventh
    with torch.no_grad():
        return ids, model(ids, use_cache=False).logits


@pytest.mark.parametrize("keep", [1, 3, L + 2, 6 * L + 3, 100])
@pytest.mark.parametrize("use_cache", [True, False])
def test_kept_logits_equal_the_full_forward(model, ids_and_full, keep, use_cache):
    """An int ``logits_to_keep`` (inside the last piece, across pieces, all, more than all) gives the full
    forward's last positions, streamed in pieces with the cache or in one pass without."""
    ids, full = ids_and_full
    with torch.no_grad():
        out = model(ids, use_cache=use_cache, logits_to_keep=keep)
    torch.testing.assert_close(out.logits, full[:, -keep:], rtol=1e-5, atol=1e-5)
    if use_cache:
        assert output_cache(out).get_seq_length() == ids.shape[1]


def test_kept_positions_by_index_and_the_cache_after_them(model, ids_and_full):
    """A tensor ``logits_to_keep`` (positions in any order) gives those positions' logits; decoding on from a
    prefill that kept one position equals the full forward over the longer input."""
    ids, full = ids_and_full
    where = torch.tensor([20, 0, 9, 26])
    with torch.no_grad():
        picked = model(ids, use_cache=True, logits_to_keep=where).logits
        torch.testing.assert_close(picked, full[:, where], rtol=1e-5, atol=1e-5)
        prefill = model(ids[:, :-2], use_cache=True, logits_to_keep=1)
        nxt = model(ids[:, -2:], use_cache=True, **{CACHE_NAME: output_cache(prefill)})
    torch.testing.assert_close(prefill.logits, full[:, -3:-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt.logits, full[:, -2:], rtol=1e-5, atol=1e-5)


def test_left_padded_and_embedded_inputs_keep_the_same_logits(model):
    """Left padding (a row of 17 real tokens beside one of 27) and ``inputs_embeds`` stream as ids do."""
    ids = tokens(2, 27, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        kept = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=2).logits
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(
            inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=2
        ).logits
    torch.testing.assert_close(kept, full[:, -2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_embeds, full[:, -2:], rtol=1e-5, atol=1e-5)


def test_hidden_states_of_every_layer_still_come_back_whole(model, ids_and_full):
    ids, _ = ids_and_full
    with torch.no_grad():
        whole = model(ids, use_cache=False, output_hidden_states=True).hidden_states
        streamed = model(ids, use_cache=True, logits_to_keep=1, output_hidden_states=True).hidden_states
    assert len(streamed) == len(whole) == model.config.num_hidden_layers + 1
    for a, b in zip(streamed, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _streaming_footprint(model, segments: int):
    """The cache's tensor shapes after a streaming prefill of ``segments`` segments and 3 more tokens, and the
    largest number of elements any submodule returned during it."""
    largest = [0]

    def record(module, args, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            out = model(tokens(2, segments * L + 3, seed=segments), use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    cache = output_cache(out)
    shapes = {(i, name): tuple(t.shape) for i, layer in cache.states.items() for name, t in layer.items()}
    return shapes, largest[0], out.logits.shape


def test_streaming_prefill_holds_nothing_that_grows_with_the_input(model):
    """After 3 and after 9 segments (each plus 3 tokens of an unfinished one): the same cache (per layer the
    memory, and keys, values and the real-token mask of 3 tokens), the same largest module output (the embedding,
    blocks and LM head each see one piece at most), one position's logits."""
    shapes3, largest3, logits3 = _streaming_footprint(model, 3)
    shapes9, largest9, logits9 = _streaming_footprint(model, 9)
    assert shapes3 == shapes9
    assert shapes3[(0, "keys")][1] == shapes3[(0, "real")][1] == 3
    cfg = model.config
    assert shapes3[(0, "state")] == (2, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim + 1)
    assert largest3 == largest9
    # the largest output is one piece's feed-forward or LM-head activations, not the input's
    assert largest3 <= 2 * L * max(cfg.intermediate_size, cfg.vocab_size)
    assert logits3 == logits9 == (2, 1, cfg.vocab_size)


def test_generate_from_a_prompt_of_many_segments_is_greedy_over_the_full_forward(model):
    prompt = tokens(1, 5 * L + 2, seed=7)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(3):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    torch.testing.assert_close(generated, seq, rtol=0, atol=0)


def test_bad_inputs_are_value_errors(model):
    with pytest.raises(ValueError, match="keep_last"):
        model.model(tokens(1, 5), keep_last=-1)
    with pytest.raises(ValueError, match="token id 300"):
        model(torch.tensor([[5, 300]]), use_cache=True, logits_to_keep=1)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(tokens(1, 5), inputs_embeds=torch.zeros(1, 5, model.config.hidden_size))
