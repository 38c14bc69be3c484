"""The delta rule family: linear attention whose state is corrected, not only added to, at every token.

One op, the generalised delta rule of RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 "Goose" with Expressive
Dynamic State Evolution", arXiv:2503.14456), with a diagonal-plus-rank-one transition per token and head:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,      w_t = exp(g_t) (g_t <= 0, per key channel)
    o_t = scale * S_t q_t

written with S as (Dv x Dk), as the paper does. **States are stored transposed**, as (Dk, Dv) per head:
``initial_state`` and the final state are [N, H, Dk, Dv] (the layout of ``zoo.ops.retention`` and of fla), i.e.
state[n, h, i, j] = S[j, i]. RWKV-7's own (H, Dv, Dk) ``att_kv`` state is its transpose.

Special cases, all through the same op:

- RWKV-7: q = r, k = k̃ (the replaced key), a = -κ̂, b = κ̂ * a (the in-context learning rate), g = log w
  (w = exp(-exp(-0.5) sigmoid(.)) in the paper), scale = 1.
- DeltaNet (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers", arXiv:2102.11174;
  Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
  arXiv:2406.06484) and Gated DeltaNet (Yang et al. 2024, "Gated Delta Networks: Improving Mamba2 with Delta
  Rule", arXiv:2412.06464): S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, ``delta_rule``
  below, with alpha_t = exp(g_t): w = alpha, a = alpha * k, b = -beta k, and beta v as the value.
- Infini-attention's delta memory (Munkhdalai et al. 2024, "Leave No Context Behind", arXiv:2404.07143, eq. 9)
  updates M_s = M_{s-1} + σ(K)^T (V - σ(K) M_{s-1} / (σ(K) z_{s-1})), with M (Dk x Dv) = our stored state. Done
  token by token (a segment of one token), it is the op with k = a = σ(k_t), b = -σ(k_t) / (σ(k_t) . z_{t-1}),
  g = 0 and q = σ(q_t), z_t = z_{t-1} + σ(k_t) being a plain cumulative sum computed outside the op. The paper's
  update of a whole segment at once from M_{s-1} (every token of the segment retrieving from the same M_{s-1})
  is one rank-L correction per segment, (I - σ(K)^T diag(1 / σ(K) z) σ(K)) M + σ(K)^T V: a dense matmul per
  segment, which the model does without this op.

Backends (see ``zoo.ops.dispatch``): ``naive`` (the loop over time, the oracle), ``torch`` (chunks through the
WY / UT transform, see ``chunk.py``) and ``triton`` (the same chunked form as Triton kernels, forward and backward,
in chunks of 16 tokens whatever ``chunk_size``; see ``triton.py``).

    out, final_state = dplr_delta_rule(q, k, v, a, b, g, initial_state=h0, output_final_state=True)
    out_t, state = dplr_delta_rule_step(q_t, k_t, v_t, a_t, b_t, g_t, state)        # decoding, O(1) per token
    out, final_state = delta_rule(q, k, v, beta, g=log_alpha)                        # (Gated) DeltaNet
"""

from __future__ import annotations

import torch

from zoo.ops.delta_rule import chunk, naive
from zoo.ops.dispatch import resolve_backend

__all__ = ["delta_rule", "delta_rule_step", "dplr_delta_rule", "dplr_delta_rule_step"]


def _shape_error(op: str, name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{op}: {name} has shape {tuple(got.shape)}, expected {expected}")


def _check_floating(op: str, like: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, x in tensors.items():
        if x is not None and not x.is_floating_point():
            raise ValueError(f"{op}: {name} has dtype {x.dtype}, expected a floating dtype")


def _check_same_dtype(op: str, q: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        if x.dtype != q.dtype:
            raise ValueError(f"{op}: {name} has dtype {x.dtype}, expected the dtype of q, {q.dtype}")


def _key_gates(op: str, name: str, g: torch.Tensor, lead: tuple[int, ...], Dk: int) -> torch.Tensor:
    """A log-decay per key channel, lead + (Dk,), or one per head, lead (broadcast over the key channels)."""
    _check_floating(op, g, **{name: g})
    if tuple(g.shape) == (*lead, Dk):
        return g
    if tuple(g.shape) == lead:
        return g[..., None].expand(*lead, Dk)
    dims = ", ".join(map(str, lead))
    raise _shape_error(op, name, g, f"[{dims}, Dk] (per key channel) or [{dims}] (per head), Dk={Dk}")


def _validate(op, q, k, v, initial_state, cu_seqlens, chunk_size, **like_q) -> None:
    """Check a full call's shapes and dtypes; ``like_q`` are more tensors of q's shape (a, b)."""
    if q.dim() != 4:
        raise _shape_error(op, "q", q, "[B, T, H, Dk]")
    B, T, H, Dk = q.shape
    _check_floating(op, q, q=q, initial_state=initial_state)
    for name, x in {"k": k, **like_q}.items():
        if tuple(x.shape) != tuple(q.shape):
            raise _shape_error(op, name, x, f"the shape of q, [B, T, H, Dk]={list(q.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise _shape_error(op, "v", v, f"[B, T, H, Dv]=[{B}, {T}, {H}, Dv]")
    _check_same_dtype(op, q, k=k, v=v, **like_q)
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _shape_error(op, "cu_seqlens", cu_seqlens, "[N + 1] cumulative sequence lengths")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int64 or int32")
        if B != 1:
            raise _shape_error(op, "q", q, f"B == 1 when cu_seqlens is given (packed sequences), got B={B}")
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"{op}: cu_seqlens={cu_seqlens.tolist()}, expected non-decreasing offsets from 0 to T={T}"
            )
        N = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, Dk, v.shape[-1]):
        expected = f"[N, H, Dk, Dv]={[N, H, Dk, v.shape[-1]]} (N: batch size or number of packed sequences)"
        raise _shape_error(op, "initial_state", initial_state, expected)
    if chunk_size is not None:
        chunk.check_chunk_size(chunk_size, op)


def dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generalised delta rule (diagonal-plus-rank-one transition) over whole sequences.

    Args:
        q, k, a, b: [B, T, H, Dk]. v: [B, T, H, Dv].
        g: log-decay, <= 0: [B, T, H, Dk] (per key channel, RWKV-7's log w) or [B, T, H] (one per head).
        scale: multiplies S_t q_t; defaults to Dk ** -0.5 (RWKV-7 uses 1.0).
        initial_state: [N, H, Dk, Dv], the (transposed, see the module docstring) state before the first token; N
            is B, or the number of packed sequences.
        output_final_state: also return the state after the last token, [N, H, Dk, Dv], float32 (float64 for
            float64 inputs).
        cu_seqlens: LongTensor [N + 1] of cumulative lengths of sequences packed along T, with B == 1. No state
            crosses a boundary.
        chunk_size: tokens per chunk of the ``torch`` backend, a power of 2 (the ``triton`` backend's chunks are
            16 tokens). None: chosen from the head sizes (``chunk.default_chunk_size``: 16 for heads up to 64).
        backend: ``naive``, ``torch`` or ``triton``; default from ``ZOO_BACKEND``, then the device.

    Returns:
        (out [B, T, H, Dv] in the dtype of v, final_state or None).
    """
    op = "dplr_delta_rule"
    _validate(op, q, k, v, initial_state, cu_seqlens, chunk_size, a=a, b=b)
    B, T, H, Dk = q.shape
    g = _key_gates(op, "g", g, (B, T, H), Dk)
    if scale is None:
        scale = Dk**-0.5
    name = resolve_backend(op, backend, q.device)
    args = (q, k, v, a, b, g, scale, initial_state, output_final_state, cu_seqlens)
    if name == "naive":
        return naive.naive_dplr_delta_rule(*args)
    if name == "triton":
        # imported here so that zoo imports without triton, and triton is only imported when asked for
        from zoo.ops.delta_rule import triton as triton_impl

        return triton_impl.triton_dplr_delta_rule(*args)
    if chunk_size is None:
        chunk_size = chunk.default_chunk_size(Dk, v.shape[-1])
    return chunk.chunk_dplr_delta_rule(*args, chunk_size=chunk_size)


def _one_token(
    op: str, tensors: dict[str, torch.Tensor | None]
) -> tuple[dict[str, torch.Tensor | None], bool]:
    """Drop the length-1 time axis of [B, 1, H, D] / [B, 1, H] inputs when q has one; say whether it had."""
    q = tensors["q"]
    if q.dim() == 4:
        if q.shape[1] != 1:
            raise _shape_error(op, "q", q, "[B, H, Dk] or [B, 1, H, Dk] (one token)")
        return {n: x if x is None else x[:, 0] for n, x in tensors.items()}, True
    if q.dim() != 3:
        raise _shape_error(op, "q", q, "[B, H, Dk] or [B, 1, H, Dk] (one token)")
    return tensors, False


def dplr_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, O(1) in the context length, in the stored layout (S^T, (Dk, Dv)):
    S <- (diag(e^g) + b a^T) S + k v^T;  o = scale S^T q.

    Args:
        q, k, a, b: [B, H, Dk] or [B, 1, H, Dk]. v: [B, H, Dv] or [B, 1, H, Dv] (the layout of q).
        g: this token's log-decay, [B, H, Dk] or [B, H] (with the time axis if q has one).
        state: [B, H, Dk, Dv], as returned by ``dplr_delta_rule(..., output_final_state=True)`` or a previous step;
            None starts from zeros.
        scale: defaults to Dk ** -0.5.

    Returns:
        (out in the layout of v, new_state [B, H, Dk, Dv], float32 or float64 as ``state`` (or the inputs)).
    """
    op = "dplr_delta_rule_step"
    t, with_time = _one_token(op, {"q": q, "k": k, "v": v, "a": a, "b": b, "g": g})
    q, k, v, a, b, g = (t[n] for n in ("q", "k", "v", "a", "b", "g"))
    B, H, Dk = q.shape
    _check_floating(op, q, q=q, state=state)
    for name, x in (("k", k), ("a", a), ("b", b)):
        if tuple(x.shape) != (B, H, Dk):
            raise _shape_error(op, name, x, f"the shape of q, {[B, H, Dk]}")
    if v.dim() != 3 or tuple(v.shape[:2]) != (B, H):
        raise _shape_error(op, "v", v, f"[B, H, Dv]=[{B}, {H}, Dv]")
    _check_same_dtype(op, q, k=k, v=v, a=a, b=b)
    g = _key_gates(op, "g", g, (B, H), Dk)
    Dv = v.shape[-1]
    acc = naive.state_dtype(q.dtype) if state is None else state.dtype
    if state is None:
        state = q.new_zeros(B, H, Dk, Dv, dtype=acc)
    elif tuple(state.shape) != (B, H, Dk, Dv):
        raise _shape_error(op, "state", state, f"[B, H, Dk, Dv]={[B, H, Dk, Dv]}")
    if scale is None:
        scale = Dk**-0.5
    out_dtype = v.dtype
    q, k, v, a, b, g = (x.to(acc) for x in (q, k, v, a, b, g))
    S = state.to(acc)
    read = torch.einsum("bhk,bhkv->bhv", a, S)  # (B, H, Dv): a^T S
    S = g.exp()[..., None] * S + b[..., :, None] * read[..., None, :] + k[..., :, None] * v[..., None, :]
    out = (scale * torch.einsum("bhk,bhkv->bhv", q, S)).to(out_dtype)
    return (out[:, None] if with_time else out), S


def _delta_rule_inputs(op, q, k, v, beta, g):
    """(Gated) DeltaNet as the general op's inputs: w = alpha, a = alpha k, b = -beta k, the value beta v."""
    lead = tuple(q.shape[:-1])
    if v.dim() != q.dim() or tuple(v.shape[:-1]) != lead:
        raise _shape_error(op, "v", v, f"{list(lead)} + [Dv]")
    if tuple(beta.shape) != lead:
        raise _shape_error(op, "beta", beta, f"{list(lead)} (one writing strength per head and token)")
    if beta.dtype != q.dtype:
        raise ValueError(f"{op}: beta has dtype {beta.dtype}, expected the dtype of q, {q.dtype}")
    if g is None:
        g = q.new_zeros(lead)
    g = _key_gates(op, "g", g, lead, q.shape[-1])
    a = g.exp().to(k.dtype) * k
    b = -beta[..., None] * k
    return a, b, beta[..., None] * v, g


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet, and Gated DeltaNet with ``g``: S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
    o_t = scale S_t q_t, alpha_t = exp(g_t); a thin wrapper on ``dplr_delta_rule``.

    Args:
        q, k: [B, T, H, Dk] (the papers L2-normalise q and k; that is the caller's). v: [B, T, H, Dv].
        beta: [B, T, H], the writing strength (in (0, 1) after a sigmoid; up to 2 keeps the state bounded).
        g: log alpha <= 0, [B, T, H] (Gated DeltaNet) or [B, T, H, Dk] (a decay per key channel); None: no decay.
        scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend: as ``dplr_delta_rule``
            (states [N, H, Dk, Dv], the transpose of the papers' S).
    """
    op = "delta_rule"
    if q.dim() != 4:
        raise _shape_error(op, "q", q, "[B, T, H, Dk]")
    _check_floating(op, q, q=q, beta=beta)
    if tuple(k.shape) != tuple(q.shape):
        raise _shape_error(op, "k", k, f"the shape of q, [B, T, H, Dk]={list(q.shape)}")
    a, b, v_in, w = _delta_rule_inputs(op, q, k, v, beta, g)
    return dplr_delta_rule(
        q, k, v_in, a, b, w, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend,
    )  # fmt: skip


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of ``delta_rule``: q, k [B, H, Dk] or [B, 1, H, Dk]; v likewise with Dv; beta and g
    [B, H] or [B, 1, H] (g also [.., Dk]); state [B, H, Dk, Dv] or None (zeros)."""
    op = "delta_rule_step"
    if q.dim() not in (3, 4):
        raise _shape_error(op, "q", q, "[B, H, Dk] or [B, 1, H, Dk] (one token)")
    _check_floating(op, q, q=q, beta=beta)
    if tuple(k.shape) != tuple(q.shape):
        raise _shape_error(op, "k", k, f"the shape of q, {list(q.shape)}")
    a, b, v_in, w = _delta_rule_inputs(op, q, k, v, beta, g)
    return dplr_delta_rule_step(q, k, v_in, a, b, w, state, scale=scale)
