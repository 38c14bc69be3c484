"""The short causal depthwise convolution, written out: the oracle every faster form is tested against.

Every channel c is filtered on its own by K taps, looking back over the last K inputs (the convolution in front of
the SSM in Mamba, Gu & Dao 2023, arXiv:2312.00752, section 3.4; also Mamba-2, the hybrids and Hyena's short
filter), with the convention of transformers' ``MambaMixer`` and of the ``causal_conv1d`` package:

    y_t[c] = act(bias[c] + sum_{k=0}^{K-1} weight[c, k] x_{t-K+1+k}[c])        (weight[:, -1] meets x_t)

Inputs before the first token come from the state, the last K - 1 inputs seen (oldest first; zeros at the start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sums run in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation``: None (identity), or "silu" / "swish" (the same function)."""
    return y if activation is None else F.silu(y)


def naive_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sum over taps. x (batch, T, C); weight (C, K); bias (C,); states (batch, C, K - 1), or one per packed
    sequence with ``cu_seqlens`` (each sequence a separate call: none sees another's inputs)."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(len(bounds) - 1):
            h0 = None if initial_state is None else initial_state[n : n + 1]
            x_n = x[:, bounds[n] : bounds[n + 1]]
            y_n, s_n = naive_causal_conv1d(x_n, weight, bias, activation, h0, output_final_state)
            outs.append(y_n)
            states.append(s_n)
        return torch.cat(outs, dim=1), torch.cat(states) if output_final_state else None
    batch, T, C = x.shape
    K = weight.shape[1]
    acc = compute_dtype(x.dtype)
    if initial_state is None:
        history = x.new_zeros(batch, K - 1, C, dtype=acc)
    else:
        history = initial_state.to(acc).transpose(1, 2)  # (batch, K - 1, C), oldest first
    xs = torch.cat([history, x.to(acc)], dim=1)  # (batch, K - 1 + T, C): xs[:, K - 1 + t] = x_t
    w = weight.to(acc)
    y = x.new_zeros(batch, T, C, dtype=acc)
    for k in range(K):
        y = y + w[:, k] * xs[:, k : k + T]  # tap k meets x_{t - K + 1 + k}
    if bias is not None:
        y = y + bias.to(acc)
    y = activate(y, activation)
    final = xs[:, T:].transpose(1, 2).to(x.dtype) if output_final_state else None  # (batch, C, K - 1)
    return y.to(x.dtype), final
