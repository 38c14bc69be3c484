"""The shared attention module against a dense softmax written out by hand."""

import pytest
import torch

from zoo.modules import Attention, build_attention_mask


def dense_reference(attn: Attention, x: torch.Tensor, allowed: torch.Tensor, bias=None) -> torch.Tensor:
    """The attention written out; ``bias`` (H, T, T), ALiBi's, added to the scores."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / D**0.5
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_dense_softmax(causal, window, kv_heads):
    torch.manual_seed(0)
    attn = Attention(32, 4, kv_heads, causal=causal, sliding_window=window).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    i, j = torch.arange(11)[:, None], torch.arange(11)[None]
    allowed = torch.ones(11, 11, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j).abs() < window if not causal else (i - j) < window
    mask = build_attention_mask(
        batch_size=2, q_len=11, past_len=0, device=x.device, causal=causal, sliding_window=window
    )
    got = attn(x, attention_mask=mask)
    torch.testing.assert_close(got, dense_reference(attn, x, allowed))


def allowed_by_definition(batch, q_len, past_len, causal, window, pad, doc):
    """Who may attend whom, one query and key at a time: causal order, a window of ``window`` tokens counting
    the query, real (unpadded) keys, the same packed document; a row left with nothing is opened fully."""
    kv_len = past_len + q_len
    allowed = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            q = past_len + i
            for k in range(kv_len):
                ok = not (causal and k > q)
                ok &= window is None or (q - k < window if causal else abs(q - k) < window)
                ok &= pad is None or bool(pad[b, k])
                ok &= doc is None or past_len > 0 or bool(doc[b, i] == doc[b, k])
                allowed[b, 0, i, k] = ok
            if not allowed[b, 0, i].any():
                allowed[b, 0, i] = True
    return allowed


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("past_len", [0, 4])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_mask_follows_its_definition(causal, window, past_len, padded, packed):
    q_len, kv_len = 7, past_len + 7
    pad = torch.ones(2, kv_len, dtype=torch.long)
    if padded:
        pad[1, :3] = 0  # left padding of the second row
    # documents of 3 and 4 tokens in the first row, one document in the second; ignored with a past
    doc = torch.tensor([[1, 1, 1, 2, 2, 2, 2], [1] * 7]) if packed else None
    got = build_attention_mask(
        batch_size=2,
        q_len=q_len,
        past_len=past_len,
        device="cpu",
        causal=causal,
        padding_mask=pad if padded else None,
        doc_ids=doc,
        sliding_window=window,
    )
    expected = allowed_by_definition(2, q_len, past_len, causal, window, pad if padded else None, doc)
    if got is None:
        # no mask means the kernel's own pattern: causal from the first key (is_causal, only without a past
        # or for a single query), or everything
        i, k = torch.arange(past_len, kv_len)[:, None], torch.arange(kv_len)[None]
        plain = (k <= i) if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
        assert past_len == 0 or not causal
        assert torch.equal(expected, plain.expand_as(expected))
    else:
        assert got.dtype == torch.bool and torch.equal(got, expected)


def test_no_mask_where_the_kernel_pattern_is_exact():
    """SDPA's fast path: nothing is built for plain causal or full attention, one document, no padding."""
    kw = dict(batch_size=2, q_len=6, device="cpu")
    assert build_attention_mask(past_len=0, **kw) is None
    assert build_attention_mask(past_len=0, causal=False, **kw) is None
    assert build_attention_mask(past_len=0, doc_ids=torch.ones(2, 6, dtype=torch.long), **kw) is None
    assert build_attention_mask(past_len=0, padding_mask=torch.ones(2, 6), **kw) is None
    assert build_attention_mask(past_len=0, sliding_window=8, **kw) is None
    assert build_attention_mask(past_len=5, q_len=1, batch_size=2, device="cpu") is None
    assert build_attention_mask(past_len=5, **kw) is not None



@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("limit", [512, 8])
def test_half_attention_on_cpu_runs_in_float32_over_few_keys(monkeypatch, alibi, limit):
    """Under CPU bf16 autocast, SDPA over fewer keys than ``CPU_HALF_ATTENTION_MIN_KEYS`` gets float32 inputs
    with autocast off (the half CPU kernel's backward is slow at short lengths); over more, autocast's bf16. Either
    way the output and the input's gradient are the dense float32 softmax's, to bf16's precision."""
    import transformers.modeling_utils as mu

    import zoo.modules.attention as attention_module

    seen = []
    sdpa = mu.ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, q, k, v, mask, **kwargs):
        seen.append(({q.dtype, k.dtype, v.dtype}, torch.is_autocast_enabled("cpu")))
        return sdpa(module, q, k, v, mask, **kwargs)

    monkeypatch.setitem(mu.ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    monkeypatch.setattr(attention_module, "CPU_HALF_ATTENTION_MIN_KEYS", limit)
    torch.manual_seed(0)
    keys = 12
    attn = Attention(32, 4, 2, alibi=alibi)
    x = torch.randn(2, keys, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x)
    got.float().square().sum().backward()
    if keys < limit:
        assert seen == [({torch.float32}, False)]
    else:
        assert seen == [({torch.bfloat16}, True)]
    assert got.dtype == torch.bfloat16  # o_proj under autocast, as without the route
    grad, x.grad = x.grad.clone(), None
    i, j = torch.arange(keys)[:, None], torch.arange(keys)[None]
    if alibi:
        slopes = attention_module.alibi_slopes(4)
        bias = -slopes[:, None, None] * (i - j).clamp(min=0)
        reference = dense_reference(attn, x, j <= i, bias)
    else:
        reference = dense_reference(attn, x, j <= i)
    torch.testing.assert_close(got.float(), reference, rtol=0.02, atol=0.01)
    reference.square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=0.05, atol=0.02)

