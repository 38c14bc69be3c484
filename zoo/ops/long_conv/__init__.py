"""Long convolution: the causal per-channel convolution with a filter as long as the sequence, of Hyena.

Hyena (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models", arXiv:2302.10866) and
HyenaDNA (Nguyen et al. 2023, arXiv:2306.15794) filter each channel c of the input with a long filter h[c] and add
a skip term, channels-last:

    y_t[c] = sum_{s <= t} h[c, t - s] u_s[c] + D[c] u_t[c]

The state is the last L - 1 inputs ([B, C, L - 1], oldest first): everything a filter of length L still reaches.
``initial_state`` may be any number S of inputs before the first token (most recent last). Backends (see
``zoo.ops.dispatch``): ``naive`` (the sum over taps, the oracle), ``torch`` (FFT for long sequences, a blocked
Toeplitz matmul for short ones; ``method=`` forces one) and ``triton`` (a blocked causal convolution, forward and
backward, for filters reaching at most ``TRITON_DIRECT_MAX_TAPS`` steps; the FFT form, cuFFT on a GPU, beyond).

The direct kernel costs O(T L) per channel, the FFT form O(T log T). On an H200 (bf16, width 1024, 4 layers) zoo's
Hyena with the direct kernel at every length trained at 102,836 tokens/s at T = 4096 and 32,522 at 16384 (time
exponent 1.83, ``bench/results/gpu_h200_20261128_run2``); counting three convolutions of T^2 / 2 taps each
(forward, input and filter gradients) over two filters and four layers, that step ran its convolutions at about
13 TFLOP/s, several milliseconds already at 1K. The crossover, 512 taps, is that estimate, not a GPU measurement.

    y, state = long_conv(u, h, D, output_final_state=True)
    y_t, state = long_conv_step(u_t, h, D, state)          # decoding: the next output from the cached inputs
"""

from __future__ import annotations

import torch

from zoo.ops.dispatch import resolve_backend
from zoo.ops.long_conv import chunk, naive

__all__ = ["TRITON_DIRECT_MAX_TAPS", "long_conv", "long_conv_step"]

# The longest reach (taps a convolution can use, min(L, S + T)) that the ``triton`` backend runs as its direct
# kernel; longer ones run the FFT form (module docstring).
TRITON_DIRECT_MAX_TAPS = 512


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"long_conv: {name} has shape {tuple(got.shape)}, expected {expected}")


def _check_filter(u, h, D, C: int) -> None:
    for name, t in (("u", u), ("h", h), ("D", D)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"long_conv: {name} has dtype {t.dtype}, expected a floating dtype")
    if h.dim() != 2 or h.shape[0] != C or h.shape[1] < 1:
        raise _shape_error("h", h, f"[C, L] with C={C} (channels of u) and L >= 1")
    if D is not None and tuple(D.shape) != (C,):
        raise _shape_error("D", D, f"[C]=[{C}]")


def _validate(u, h, D, initial_state, cu_seqlens) -> None:
    if u.dim() != 3:
        raise _shape_error("u", u, "[B, T, C]")
    batch, T, C = u.shape
    _check_filter(u, h, D, C)
    rows = batch
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error("cu_seqlens", cu_seqlens, "[N_seq + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"long_conv: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32"
            )
        if batch != 1:
            raise _shape_error("u", u, f"B == 1 when cu_seqlens is given (packed sequences), got B={batch}")
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T:
            raise ValueError(f"long_conv: cu_seqlens runs from {first} to {last}, expected from 0 to T={T}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"long_conv: cu_seqlens={cu_seqlens.tolist()} decreases, expected non-decreasing"
            )
        rows = cu_seqlens.numel() - 1
    if initial_state is not None:
        if initial_state.dim() != 3 or tuple(initial_state.shape[:2]) != (rows, C):
            what = "[N_seq, C, S]" if cu_seqlens is not None else "[B, C, S]"
            raise _shape_error("initial_state", initial_state, f"{what} with {what[1:-4]}={[rows, C]}")
        if not initial_state.is_floating_point():
            raise ValueError(f"long_conv: initial_state has dtype {initial_state.dtype}, expected floating")


def long_conv(
    u: torch.Tensor,
    h: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    method: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The long causal convolution over whole sequences.

    Args:
        u: [B, T, C]. h: [C, L], the filter (h[:, 0] multiplies the current token); L may be shorter than T
            (taps beyond L - 1 are zero) or longer (taps beyond T - 1 + S are never reached). D: [C] skip weights.
        initial_state: [B, C, S], the S inputs just before the first token, most recent last (default none);
            [N_seq, C, S] with ``cu_seqlens``.
        output_final_state: also return the last L - 1 inputs, [B, C, L - 1] (zeros in front where fewer were
            seen), dtype of u; [N_seq, C, L - 1] with ``cu_seqlens``.
        cu_seqlens: LongTensor [N_seq + 1] of cumulative lengths of sequences packed along T, with B == 1. No
            sequence sees another's inputs.
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.
        method: ``fft`` or ``toeplitz`` forces that torch form on either backend; None chooses by length: on
            ``torch`` Toeplitz up to ``chunk.TOEPLITZ_MAX_LEN`` tokens and FFT above, on ``triton`` the Triton
            kernel for reaches up to ``TRITON_DIRECT_MAX_TAPS`` and FFT above.

    Returns:
        (y [B, T, C] in the dtype of u, final_state or None).
    """
    _validate(u, h, D, initial_state, cu_seqlens)
    if method not in chunk.METHODS:
        raise ValueError(f"long_conv: method={method!r}, expected one of {chunk.METHODS}")
    name = resolve_backend("long_conv", backend, u.device)
    args = (u, h, D, initial_state, output_final_state, cu_seqlens)
    if name == "naive":
        return naive.naive_long_conv(*args)
    if name == "triton":
        S = 0 if initial_state is None else initial_state.shape[2]
        if method is not None or min(h.shape[1], S + u.shape[1]) > TRITON_DIRECT_MAX_TAPS:
            return chunk.long_conv(*args, method=method or "fft")
        from zoo.ops.long_conv.triton import triton_long_conv

        return triton_long_conv(*args)
    return chunk.long_conv(*args, method=method)


def long_conv_step(
    u: torch.Tensor,
    h: torch.Tensor,
    D: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step from the cached inputs, O(min(S, L)): y = sum_j h[:, j] u_{t - j} + D u_t.

    Args:
        u: [B, C] (or [B, 1, C]). h: [C, L]. D: [C].
        state: [B, C, S], the inputs before this token, most recent last (any S; the last L - 1 are used), as
            returned by ``long_conv(..., output_final_state=True)`` or a previous step; None: no inputs before.

    Returns:
        (y in the layout and dtype of u, the last L - 1 inputs [B, C, L - 1], this one included, in the dtype of
        ``state``, else of u).
    """
    with_time = u.dim() == 3
    if with_time:
        if u.shape[1] != 1:
            raise _shape_error("u", u, "[B, C] or [B, 1, C] (one token)")
        u = u[:, 0]
    if u.dim() != 2:
        raise _shape_error("u", u, "[B, C] or [B, 1, C] (one token)")
    batch, C = u.shape
    _check_filter(u, h, D, C)
    if state is not None and (state.dim() != 3 or tuple(state.shape[:2]) != (batch, C)):
        raise _shape_error("state", state, f"[B, C, S] with [B, C]={[batch, C]}")
    L = h.shape[1]
    acc = naive.compute_dtype(u.dtype)
    past = u.new_zeros(batch, C, 0) if state is None else state
    window = torch.cat([naive.last_inputs(past.to(acc), L - 1), u.to(acc)[..., None]], dim=-1)  # (B, C, L)
    y = (window * h.to(acc).flip(-1)).sum(-1)  # the newest input meets h[:, 0]
    if D is not None:
        y = y + D.to(acc) * u.to(acc)
    y = y.to(u.dtype)
    return (y[:, None] if with_time else y), window[..., 1:].to(past.dtype)
