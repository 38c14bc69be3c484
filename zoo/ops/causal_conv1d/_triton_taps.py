"""Where the taps of the Triton causal conv1d (``triton.py``) read from: device functions inlined into its kernels.

Same op as ``naive.py`` (Mamba, Gu & Dao 2023, arXiv:2312.00752, section 3.4): a token's sequence and its bounds,
the extended input xs (the initial state in front of the sequence's inputs) at any step, and the convolution
before the activation. Kept apart from the kernels so that every ``@triton.jit`` function of ``triton.py`` is a
kernel that is launched (and compiled for GPU targets by ``tests/ops/test_triton_gpu_compile.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bounds(seq_of_token, cu_seqlens, row, t, m_t, T, PACKED: tl.constexpr):
    """The sequence of every token of the block, and its first and one-past-last token."""
    if PACKED:
        seq = tl.load(seq_of_token + t, mask=m_t, other=0)
        bos = tl.load(cu_seqlens + seq, mask=m_t, other=0).to(tl.int32)
        eos = tl.load(cu_seqlens + seq + 1, mask=m_t, other=0).to(tl.int32)
    else:
        seq = tl.zeros_like(t) + row
        bos = tl.zeros_like(t)
        eos = tl.zeros_like(t) + T
    return seq, bos, eos


@triton.jit
def _history(x, h0, seq, bos, s, c, m_t, m_c, T, C, K, USE_H0: tl.constexpr):
    """xs at input step s (BT,) of each token's sequence: x_s from the sequence, else its initial state slot."""
    inside = m_t & (s >= bos)
    v = tl.load(x + s[:, None] * C + c[None, :], mask=inside[:, None] & m_c[None, :], other=0.0)
    if USE_H0:
        slot = K - 1 + s - bos  # < K - 1 before the sequence's first token
        before = m_t & (s < bos) & (slot >= 0)
        p = h0 + seq[:, None] * C * (K - 1) + c[None, :] * (K - 1) + slot[:, None]
        v += tl.load(p, mask=before[:, None] & m_c[None, :], other=0.0)
    return v


@triton.jit
def _pre(x, w, b, h0, seq, bos, t, c, m_t, m_c, T, C, K: tl.constexpr, ACC: tl.constexpr, USE_BIAS: tl.constexpr,
         USE_H0: tl.constexpr):  # fmt: skip
    """The convolution before the activation, (BT, BC) in ACC."""
    acc = tl.zeros([t.shape[0], c.shape[0]], dtype=ACC)
    if USE_BIAS:
        acc += tl.load(b + c, mask=m_c, other=0.0).to(ACC)[None, :]
    for k in tl.static_range(K):
        w_k = tl.load(w + c * K + k, mask=m_c, other=0.0).to(ACC)
        x_k = _history(x, h0, seq, bos, t - (K - 1) + k, c, m_t, m_c, T, C, K, USE_H0)
        acc += w_k[None, :] * x_k.to(ACC)
    return acc
