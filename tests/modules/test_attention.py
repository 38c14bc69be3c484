"""The shared attention module against a dense softmax written out by hand."""

import pytest
import torch

from zoo.modules import Attention, build_attention_mask


def dense_reference(attn: Attention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / D**0.5
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


def test_padding_and_documents_in_the_mask():
    pad = torch.tensor([[0, 0, 1, 1, 1, 1]])
    doc = torch.tensor([[1, 1, 1, 2, 2, 2]])
    mask = build_attention_mask(
        batch_size=1, q_len=6, past_len=0, device="cpu", padding_mask=pad, doc_ids=doc
    )
    assert mask.shape == (1, 1, 6, 6)
    assert not mask[0, 0, 2, :2].any(), "no attention to padding"
    assert not mask[0, 0, 4, :3].any() and mask[0, 0, 4, 3:5].all(), "no attention across documents"
    assert mask[0, 0, 0].all(), "a fully masked (padding) row is opened so no NaN appears"
    assert build_attention_mask(batch_size=1, q_len=6, past_len=0, device="cpu") is None
