"""Causal conv1d: the short depthwise causal convolution of Mamba, Mamba-2, the hybrids and Hyena's short filter.

Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752,
section 3.4) filters every channel on its own over its last K inputs before the SSM. Convention of transformers'
``MambaMixer`` (``nn.Conv1d(C, C, K, groups=C, padding=K - 1)`` cut to the first T outputs) and of the
``causal_conv1d`` package's ``causal_conv1d_fn(x, weight, bias, activation=...)``, here channels-last:

    y_t[c] = act(bias[c] + sum_{k=0}^{K-1} weight[c, k] x_{t-K+1+k}[c])        (weight[:, -1] meets x_t)

The state is the last K - 1 inputs, oldest first ([B, C, K - 1], as transformers' ``conv_states`` without the
slot for the current token). Backends (see ``zoo.ops.dispatch``): ``naive`` (the sum over taps, the oracle),
``torch`` (one grouped ``F.conv1d``) and ``triton`` (Triton kernels, forward and backward, ``triton.py``).

    y, final_state = causal_conv1d(x, weight, bias, activation="silu", output_final_state=True)
    y_t, state = causal_conv1d_step(x_t, weight, bias, state, activation="silu")     # decoding, O(1) per token
"""

from __future__ import annotations

import torch

from zoo.ops.causal_conv1d import chunk, naive
from zoo.ops.dispatch import resolve_backend

__all__ = ["causal_conv1d", "causal_conv1d_step"]


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"causal_conv1d: {name} has shape {tuple(got.shape)}, expected {expected}")


def _check_common(x, weight, bias, activation, C: int) -> int:
    """Check dtypes, weight [C, K], bias [C] and the activation; return K."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"causal_conv1d: {name} has dtype {t.dtype}, expected a floating dtype")
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise _shape_error("weight", weight, f"[C, K] with C={C} (channels of x) and K >= 1")
    if bias is not None and tuple(bias.shape) != (C,):
        raise _shape_error("bias", bias, f"[C]=[{C}]")
    if activation not in naive.ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation={activation!r}, expected one of {naive.ACTIVATIONS}")
    return weight.shape[1]


def _validate(x, weight, bias, activation, initial_state, cu_seqlens) -> None:
    if x.dim() != 3:
        raise _shape_error("x", x, "[B, T, C]")
    batch, T, C = x.shape
    K = _check_common(x, weight, bias, activation, C)
    rows = batch
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error("cu_seqlens", cu_seqlens, "[N_seq + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"causal_conv1d: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32"
            )
        if batch != 1:
            raise _shape_error("x", x, f"B == 1 when cu_seqlens is given (packed sequences), got B={batch}")
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T:
            raise ValueError(
                f"causal_conv1d: cu_seqlens runs from {first} to {last}, expected from 0 to T={T}"
            )
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"causal_conv1d: cu_seqlens={cu_seqlens.tolist()} decreases, expected non-decreasing"
            )
        rows = cu_seqlens.numel() - 1
    if initial_state is not None:
        if tuple(initial_state.shape) != (rows, C, K - 1):
            what = "[N_seq, C, K - 1]" if cu_seqlens is not None else "[B, C, K - 1]"
            raise _shape_error("initial_state", initial_state, f"{what}={[rows, C, K - 1]}")
        if not initial_state.is_floating_point():
            raise ValueError(
                f"causal_conv1d: initial_state has dtype {initial_state.dtype}, expected floating"
            )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The causal depthwise convolution over whole sequences.

    Args:
        x: [B, T, C]. weight: [C, K] (weight[:, -1] multiplies the current token). bias: [C].
        activation: None, or "silu" (= "swish").
        initial_state: [B, C, K - 1], the K - 1 inputs before the first token, oldest first (default zeros);
            [N_seq, C, K - 1] with ``cu_seqlens``.
        output_final_state: also return the last K - 1 inputs, [B, C, K - 1] ([N_seq, C, K - 1]), dtype of x.
        cu_seqlens: LongTensor [N_seq + 1] of cumulative lengths of sequences packed along T, with B == 1. No
            sequence sees another's inputs.
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.

    Returns:
        (y [B, T, C] in the dtype of x, final_state or None).
    """
    _validate(x, weight, bias, activation, initial_state, cu_seqlens)
    name = resolve_backend("causal_conv1d", backend, x.device)
    args = (x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
    if name == "naive":
        return naive.naive_causal_conv1d(*args)
    if name == "triton":
        # imported here so that zoo imports without triton, and triton is only imported when asked for
        from zoo.ops.causal_conv1d import triton as triton_impl

        return triton_impl.triton_causal_conv1d(*args)
    return chunk.chunk_causal_conv1d(*args)


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, O(K): y = act(bias + sum_k weight[:, k] window[:, k]) over the window state + x.

    Args:
        x: [B, C] (or [B, 1, C]). weight: [C, K]. bias: [C].
        state: [B, C, K - 1], the last K - 1 inputs, oldest first, as returned by
            ``causal_conv1d(..., output_final_state=True)`` or a previous step; None starts from zeros.

    Returns:
        (y in the layout and dtype of x, new_state [B, C, K - 1] in the dtype of ``state``, else of x).
    """
    with_time = x.dim() == 3
    if with_time:
        if x.shape[1] != 1:
            raise _shape_error("x", x, "[B, C] or [B, 1, C] (one token)")
        x = x[:, 0]
    if x.dim() != 2:
        raise _shape_error("x", x, "[B, C] or [B, 1, C] (one token)")
    batch, C = x.shape
    K = _check_common(x, weight, bias, activation, C)
    if state is not None and tuple(state.shape) != (batch, C, K - 1):
        raise _shape_error("state", state, f"[B, C, K - 1]={[batch, C, K - 1]}")
    acc = naive.compute_dtype(x.dtype)
    if state is None:
        state = x.new_zeros(batch, C, K - 1)
    window = torch.cat([state.to(acc), x.to(acc)[..., None]], dim=-1)  # (B, C, K), oldest first
    y = (window * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    y = naive.activate(y, activation).to(x.dtype)
    return (y[:, None] if with_time else y), window[..., 1:].to(state.dtype)
