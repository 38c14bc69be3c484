"""The short causal depthwise convolution as one ``F.conv1d``: the CPU fast path and the fallback everywhere.

Same op as ``naive.py`` (the convolution of Mamba, Gu & Dao 2023, arXiv:2312.00752): a grouped convolution
(groups = C, one filter per channel) over the input with its K - 1 inputs of history in front, the state (zeros
by default); ``F.conv1d`` computes the cross-correlation sum_k weight[c, k] xs[t + k], which with the history in
front is exactly y_t = sum_k weight[c, k] x_{t-K+1+k}.

Packed sequences (``cu_seqlens``, batch 1): every sequence gets its own K - 1 history slots in front of it (its
initial state, or zeros), placed with one index copy into a slightly longer sequence of T + N_seq (K - 1) steps,
so that one convolution covers all of them and no tap can reach into the previous sequence's inputs; the outputs
at the history slots are dropped, and each sequence's final state is the last K - 1 steps of its stretch (reaching
into its history when it is shorter than K - 1). No loop over sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.ops.causal_conv1d.naive import activate, compute_dtype


def _packed_layout(cu_seqlens: torch.Tensor, K: int, device: torch.device):
    """Indices into the sequence with history slots: of every token (T,), of every history slot (N_seq * (K - 1),),
    sequence-major, oldest first, and of every sequence's last K - 1 steps (N_seq, K - 1)."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    n_seq = cu.numel() - 1
    T = int(cu[-1])
    seq_of_token = torch.bucketize(torch.arange(T, device=device), cu[1:], right=True)
    tokens = torch.arange(T, device=device) + (seq_of_token + 1) * (K - 1)
    start = cu[:-1] + torch.arange(n_seq, device=device) * (K - 1)  # where each sequence's history begins
    steps = torch.arange(K - 1, device=device)
    history = (start[:, None] + steps).reshape(-1)
    end = cu[1:] + torch.arange(1, n_seq + 1, device=device) * (K - 1)  # one past each sequence's last token
    last = end[:, None] - (K - 1) + steps
    return tokens, history, last, T + n_seq * (K - 1)


def chunk_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The convolution; arguments as ``naive.naive_causal_conv1d``."""
    batch, T, C = x.shape
    K = weight.shape[1]
    if T == 0:  # F.conv1d refuses an input shorter than the filter; nothing to convolve, the state passes on
        rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        final = initial_state if initial_state is not None else x.new_zeros(rows, C, K - 1)
        return x.new_zeros(x.shape), final.to(x.dtype) if output_final_state else None
    acc = compute_dtype(x.dtype)
    w = weight.to(acc)[:, None, :]  # (C, 1, K): one filter per channel
    b = None if bias is None else bias.to(acc)
    xt = x.to(acc).transpose(1, 2)  # (batch, C, T)
    with torch.autocast(x.device.type, enabled=False):
        if cu_seqlens is None:
            if initial_state is None:
                xs = F.pad(xt, (K - 1, 0))
            else:
                xs = torch.cat([initial_state.to(acc), xt], dim=2)  # (batch, C, K - 1 + T)
            y = F.conv1d(xs, w, b, groups=C)  # (batch, C, T)
            final = xs[..., T:] if output_final_state else None  # (batch, C, K - 1)
        else:
            tokens, history, last, length = _packed_layout(cu_seqlens, K, x.device)
            n_seq = cu_seqlens.numel() - 1
            xs = xt.new_zeros(1, C, length).index_copy(2, tokens, xt)
            if initial_state is not None:
                h0 = initial_state.to(acc).transpose(0, 1).reshape(1, C, n_seq * (K - 1))  # sequence-major
                xs = xs.index_copy(2, history, h0)
            # output j is the window ending at step j + K - 1
            y = F.conv1d(xs, w, b, groups=C).index_select(2, tokens - (K - 1))
            final = None
            if output_final_state:
                final = xs[0][:, last].transpose(0, 1)  # (N_seq, C, K - 1)
        y = activate(y, activation)
    final = None if final is None else final.to(x.dtype)
    return y.transpose(1, 2).to(x.dtype), final
