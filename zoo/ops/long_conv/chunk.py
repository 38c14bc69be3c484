"""The long causal convolution in PyTorch: FFT for long sequences, a blocked Toeplitz matmul for short ones.

Same op as ``naive.py`` (Hyena, Poli et al. 2023, arXiv:2302.10866): y_t = sum_{s <= t} h[t - s] u_s + D u_t per
channel. Two forms of the convolution:

- ``fft_conv``: O(T log T). Input and filter zero-padded to 2T (at least T + L - 1, so the circular convolution
  of the FFT never wraps around) and multiplied in frequency (``torch.fft.rfft`` / ``irfft``), as Hyena's
  reference ``fftconv`` does; its backward (``_FFTConv``) is written out in real transforms, the skip D rides in
  the filter's spectrum, and both run a block of channels at a time (``FFT_BLOCK_ELEMENTS``).
- ``toeplitz_conv``: O(T^2 / blocks), matmuls only. The (T, T) lower-triangular Toeplitz matrix of the filter is
  cut into (B, B) blocks; a block depends only on its distance d below the diagonal, so one (C, B, B) block per
  distance is built from the filter and applied to all block pairs at that distance at once. Distances the filter
  does not reach (d B > L - 1 + B) are skipped.

``conv`` picks by length: Toeplitz up to ``TOEPLITZ_MAX_LEN`` tokens, FFT above. Measured on this project's
CPU (one thread, float32, 64 channels, batch 4, filter as long as the input, median of 30 runs), forward +
backward in ms, FFT / Toeplitz: T = 4: 0.38 / 0.40, T = 8: 0.45 / 0.53, T = 16: 0.44 / 1.4, T = 64: 0.86 / 4.1,
T = 256: 2.4 / 23 (forward only: 0.06 / 0.12 at T = 4). The two meet at about 4 tokens, so Toeplitz runs below
that (decoding a few tokens at a time) and FFT everywhere else; the crossover would sit higher where matmuls are
cheap relative to FFTs (a GPU's tensor cores).

The history (``initial_state``) goes in front of the inputs and its outputs are dropped; packed sequences
(``cu_seqlens``) are laid out right-aligned in a zero-padded (N_seq, S + T_max, C) batch, which leaves every
output unchanged (zeros in front add nothing) and puts every sequence's last inputs (its final state) in the last
columns. ``conv`` in ``long_conv`` may be another implementation of the plain convolution (the Triton one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from zoo.ops.blocking import row_blocks
from zoo.ops.long_conv.naive import compute_dtype, last_inputs

# Longest sequence the blocked Toeplitz form runs (measured crossover, see above); the block size of that form.
TOEPLITZ_MAX_LEN = 3
TOEPLITZ_BLOCK = 32
METHODS = (None, "fft", "toeplitz")


# float32 numbers per FFT buffer in one block of channels (2^20: 4 MiB); see ``_FFTConv``
FFT_BLOCK_ELEMENTS = 1 << 20


def channel_blocks(channels: int, numel: int) -> list[tuple[int, int]]:
    """Ranges of channels, each holding about ``FFT_BLOCK_ELEMENTS`` numbers where a channel holds ``numel``."""
    return row_blocks(channels, numel, block_elements=FFT_BLOCK_ELEMENTS)


class _FFTConv(torch.autograd.Function):
    """The FFT convolution with the skip D folded into the filter's spectrum, a block of channels at a time.

    - Skip: D x_t is tap 0 of the filter, and the transform of a unit impulse is 1 at every frequency, so
      rfft(h + D delta) = rfft(h) + D; its gradient is tap 0's: dD = dh[:, 0].
    - Backward in real transforms too. Autograd's own backward of ``rfft`` runs a complex-to-complex transform over
      the whole padded length (and fills the spectrum's mirrored half); here both gradients are correlations,
      computed as products with the conjugate spectra saved by the forward: dx = irfft(G conj(H))[:T],
      dh = irfft(sum_N G conj(X))[:L], G = rfft(dy) padded to 2T. The padding makes the circular correlations
      exact: x and h are zero from T and L on, so no wrapped-around term survives.
    - Blocks of channels: every padded buffer, spectrum and product of a block holds about ``FFT_BLOCK_ELEMENTS``
      numbers, so the transforms work in cache and the buffers are reused from one block to the next. Whole-length
      buffers (a (N, C, 2T) product is 256 MiB at T = 64K, C = 256) would be mapped afresh by the C library and
      faulted in page by page on every call; only the outputs and the saved spectra are whole here."""

    @staticmethod
    def forward(ctx, x, h, D):
        N, T, C = x.shape
        L = h.shape[1]
        n = 2 * T
        x_f = x.new_empty(N, C, n // 2 + 1, dtype=_complex(x.dtype))
        h_f = x.new_empty(C, n // 2 + 1, dtype=x_f.dtype)
        y = x.new_empty(N, T, C)
        for c0, c1 in channel_blocks(C, N * n):
            # the spectra straight into the saved tensors (contiguous blocks of them for a batch of one)
            xb = torch.fft.rfft(x[:, :, c0:c1].transpose(1, 2), n=n, out=x_f[:, c0:c1])  # (N, c, n // 2 + 1)
            hb = torch.fft.rfft(h[c0:c1], n=n, out=h_f[c0:c1])
            if D is not None:
                hb += D[c0:c1, None]
            y[:, :, c0:c1] = torch.fft.irfft(xb * hb, n=n)[..., :T].transpose(1, 2)
        ctx.save_for_backward(x_f, h_f)
        ctx.T, ctx.L, ctx.has_skip = T, L, D is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_f, h_f = ctx.saved_tensors
        T, L = ctx.T, ctx.L
        N, C = x_f.shape[:2]
        n = 2 * T
        need_x = ctx.needs_input_grad[0]
        need_h = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx = dy.new_empty(N, T, C) if need_x else None
        dh = dy.new_empty(C, L) if need_h else None
        for c0, c1 in channel_blocks(C, N * n):
            g_f = torch.fft.rfft(dy[:, :, c0:c1].transpose(1, 2), n=n)
            if need_x:
                dx[:, :, c0:c1] = torch.fft.irfft(g_f * h_f[c0:c1].conj(), n=n)[..., :T].transpose(1, 2)
            if need_h:
                dh[c0:c1] = torch.fft.irfft((g_f.mul_(x_f[:, c0:c1].conj())).sum(0), n=n)[..., :L]
        dD = dh[:, 0].clone() if ctx.has_skip and ctx.needs_input_grad[2] else None
        return dx, dh if ctx.needs_input_grad[1] else None, dD


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def fft_conv(x: torch.Tensor, h: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{j < L} h[:, j] x_{t - j} (+ D x_t): x (N, T, C), h (C, L) with L <= T, D (C,), all in the dtype of x;
    returns (N, T, C)."""
    return _FFTConv.apply(x, h, D)


def toeplitz_blocks(h: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """(C, d, block, block): entry [c, d, a, b] = h[c, d * block + a - b] (zero outside [0, L))."""
    C, L = h.shape
    padded = F.pad(h, (block, n_blocks * block))  # h[j] at column j + block
    d = torch.arange(n_blocks, device=h.device)[:, None, None]
    a = torch.arange(block, device=h.device)[:, None]
    b = torch.arange(block, device=h.device)
    return padded[:, d * block + a - b + block]


def toeplitz_conv(x: torch.Tensor, h: torch.Tensor, block: int = TOEPLITZ_BLOCK) -> torch.Tensor:
    """As ``fft_conv``, by block Toeplitz matmuls (one batched matmul over channels per block distance)."""
    N, T, C = x.shape
    L = h.shape[1]
    block = max(1, min(block, T))
    nb = -(-T // block)
    # (C, block, nb, N): channels batch the matmuls, every block of every sequence is a column group
    xb = F.pad(x, (0, 0, 0, nb * block - T)).reshape(N, nb, block, C).permute(3, 2, 1, 0).contiguous()
    reach = min(nb, -(-(L - 1) // block) + 1)  # block distances the filter reaches
    M = toeplitz_blocks(h, block, reach)  # (C, reach, block, block)
    y = torch.bmm(M[:, 0], xb.reshape(C, block, nb * N))
    for d in range(1, reach):
        part = torch.bmm(M[:, d], xb[:, :, : nb - d].reshape(C, block, (nb - d) * N))
        y = y + F.pad(part, (d * N, 0))  # output block i + d from input block i
    return y.reshape(C, block, nb, N).permute(3, 2, 1, 0).reshape(N, nb * block, C)[:, :T]


def conv(x: torch.Tensor, h: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """The convolution by ``method`` (``fft``, ``toeplitz``; None chooses by length)."""
    return fft_conv(x, h) if _method(method, x.shape[1]) == "fft" else toeplitz_conv(x, h)


def _method(method: str | None, length: int) -> str:
    """``method``, or the form for ``length`` steps when None."""
    return method or ("toeplitz" if length <= TOEPLITZ_MAX_LEN else "fft")


def _packed_layout(cu_seqlens: torch.Tensor, S: int, device: torch.device):
    """Where every packed token goes in the right-aligned (N_seq, S + T_max) layout, as flat indices (T,), and
    where every sequence's history goes (N_seq * S,); plus N_seq and the layout's length."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    n_seq = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    width = S + int(lengths.max()) if n_seq else S
    T = int(cu[-1])
    seq = torch.bucketize(torch.arange(T, device=device), cu[1:], right=True)
    # token i of sequence n sits at column width - len_n + i
    tokens = seq * width + width - lengths[seq] + torch.arange(T, device=device) - cu[seq]
    start = torch.arange(n_seq, device=device) * width + width - lengths - S  # each sequence's history
    history = (start[:, None] + torch.arange(S, device=device)).reshape(-1)
    return tokens, history, n_seq, width


def long_conv(
    u: torch.Tensor,
    h: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    method: str | None = None,
    conv_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole op; arguments as ``naive.naive_long_conv``. ``conv_fn(x, h)`` replaces ``conv`` when given."""
    batch, T, C = u.shape
    L = h.shape[1]
    acc = compute_dtype(u.dtype)
    run = conv_fn or (lambda x, f: conv(x, f, method))
    S = 0 if initial_state is None else initial_state.shape[2]
    x = u.to(acc)
    if cu_seqlens is None:
        if S:
            x = torch.cat([initial_state.to(acc).transpose(1, 2), x], dim=1)  # (batch, S + T, C)
        rows = x
    else:
        tokens, history, n_seq, width = _packed_layout(cu_seqlens, S, u.device)
        rows = x.new_zeros(n_seq * width, C).index_copy(0, tokens, x[0])
        if S:
            rows = rows.index_copy(0, history, initial_state.to(acc).transpose(1, 2).reshape(-1, C))
        rows = rows.reshape(n_seq, width, C)
    length = rows.shape[1]
    # the FFT form adds the skip inside (tap 0 of the filter); the others add it after
    skip_in_conv = conv_fn is None and length > 0 and _method(method, length) == "fft"
    with torch.autocast(u.device.type, enabled=False):
        f = h.to(acc)[:, :length] if length else h.to(acc)[:, :1]
        if skip_in_conv:
            y = fft_conv(rows, f, None if D is None else D.to(acc))
        else:
            y = run(rows, f) if length else rows
    if cu_seqlens is None:
        y = y[:, S:]
    else:
        y = y.reshape(-1, C).index_select(0, tokens)[None]
    if D is not None and not skip_in_conv:
        y = y + D.to(acc) * u.to(acc)
    final = None
    if output_final_state:
        final = last_inputs(rows.transpose(1, 2), L - 1).to(u.dtype)  # (rows, C, L - 1)
    return y.to(u.dtype), final
