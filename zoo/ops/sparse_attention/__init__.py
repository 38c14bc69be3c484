"""Sparse attention: softmax attention restricted to a pattern of sliding windows and global tokens, or to BigBird's
block layout of window, global and random blocks.

Longformer (Beltagy et al. 2020, "Longformer: The Long-Document Transformer", arXiv:2004.05150) attends each query to
the keys of a sliding window around it plus a few global tokens that attend, and are attended by, every token; its
causal form attends only the window behind the query. BigBird (Zaheer et al. 2020, "Big Bird: Transformers for
Longer Sequences", arXiv:2007.14062) attends, per block of queries, a window of blocks, global blocks at the ends
and random blocks (``pattern.py`` says exactly which). The pattern is described once, by :class:`SparsePattern`,
and every form of the op reads it from there:

- ``naive``: dense attention with the pattern as a T x T mask (the oracle, O(T^2));
- ``torch``: blocks of queries against the band of keys their window reaches plus the global keys, O(T * w)
  memory (``chunk.py``); for a block layout, each query block gathers its global, window and random key blocks,
  O(T * block_size) memory. The CPU path and the fallback everywhere;
- ``flex``: PyTorch's FlexAttention with a block mask built from the same pattern (``flex.py``), compiled (a fused
  kernel that skips the tiles the pattern leaves out). FlexAttention has no attention dropout and, on the CPU, no
  backward: such calls run ``torch`` instead (logged once). There is no hand-written Triton form: ``triton`` runs
  ``torch``.

Default on every device: ``torch``, the form checked against the oracle forward and backward on every device it
runs on. On CUDA, ``backend="flex"`` (or ``ZOO_BACKEND=flex``) runs FlexAttention's generated Triton kernels; it
becomes the CUDA default once it has been checked and timed on a GPU. On the CPU ``torch`` is the only sparse form
that trains. For inference on the CPU, ``backend="flex"`` ran the
forward 3-5x faster than ``torch`` at 1K-16K tokens (``python -m bench.sparse_attention``, numbers in the README),
after a compilation of about 10 s per new shape, which is why it is asked for rather than the default.

Block layouts take any length: the op pads the last block (padding keys are never attended), as transformers'
BigBird pads inputs to a multiple of ``block_size``; the last block, partial or not, is the last global block.
Random blocks come from ``random_plan=`` (an explicit ``(H or 1, nb, r)`` index tensor) or, when it is not given,
from ``pattern.random_plan`` (seeded, no global random state).

    pattern = SparsePattern(window=256)                       # Longformer's attention_window=512
    out = sparse_attention(q, k, v, pattern, global_mask=g, key_padding_mask=m,
                           global_q=qg, global_k=kg, global_v=vg)
    out_t = sparse_attention_step(q_t, k_win, v_win, SparsePattern(window=w, causal=True), past_len=n)

    bigbird = SparsePattern(block_size=64, window_blocks=3, global_blocks=1, random_blocks=3, seed=layer_idx)
    out = sparse_attention(q, k, v, bigbird, key_padding_mask=m)  # or random_plan=torch.zeros(1, nb, 3)
"""

from __future__ import annotations

import torch

from zoo.ops.dispatch import logger, resolve_backend
from zoo.ops.sparse_attention import chunk, flex, naive
from zoo.ops.sparse_attention.naive import masked_softmax
from zoo.ops.sparse_attention.pattern import SparsePattern

__all__ = ["SparsePattern", "sparse_attention", "sparse_attention_step"]

# the backend a CUDA device gets when neither ``backend=`` nor ``ZOO_BACKEND`` chooses one
CUDA_DEFAULT = "torch"  # "flex" once it has been checked and timed on a GPU
_routed: set[str] = set()


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"sparse_attention: {name} has shape {tuple(got.shape)}, expected {expected}")


def _token_mask(name: str, mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    """A (B, T) mask as bool on ``device`` (any dtype: nonzero = True), or None."""
    if mask is None:
        return None
    if tuple(mask.shape) != (B, T):
        raise _shape_error(name, mask, f"[B, T]=[{B}, {T}]")
    return mask.to(device=device, dtype=torch.bool)


def _validate(q, k, v, pattern, global_q, global_k, global_v) -> None:
    if not isinstance(pattern, SparsePattern):
        raise ValueError(f"sparse_attention: pattern is a {type(pattern).__name__}, expected a SparsePattern")
    if q.dim() != 4:
        raise _shape_error("q", q, "[B, T, H, D]")
    if not q.is_floating_point():
        raise ValueError(f"sparse_attention: q has dtype {q.dtype}, expected a floating dtype")
    if tuple(k.shape) != tuple(q.shape):
        raise _shape_error("k", k, f"the shape of q, [B, T, H, D]={list(q.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise _shape_error("v", v, f"[B, T, H, Dv]=[{', '.join(map(str, q.shape[:3]))}, Dv]")
    given = [x is not None for x in (global_q, global_k, global_v)]
    if any(given) and not all(given):
        raise ValueError("sparse_attention: pass all of global_q, global_k, global_v or none of them")
    for name, x, like in (
        ("k", k, q),
        ("v", v, q),
        ("global_q", global_q, q),
        ("global_k", global_k, k),
        ("global_v", global_v, v),
    ):
        if x is None:
            continue
        if tuple(x.shape) != tuple(like.shape):
            raise _shape_error(name, x, f"{list(like.shape)}")
        if x.dtype != q.dtype:
            raise ValueError(
                f"sparse_attention: {name} has dtype {x.dtype}, expected the dtype of q, {q.dtype}"
            )


def _check_plan(
    plan: torch.Tensor | None, pattern: SparsePattern, nb: int, H: int, device
) -> torch.Tensor | None:
    """The random plan to use: the given one, checked, or the pattern's seeded one (None without random blocks)."""
    if plan is None:
        return pattern.random_plan(nb, H, device) if pattern.random_blocks else None
    r = pattern.random_blocks
    if plan.dim() != 3 or plan.shape[0] not in (1, H) or tuple(plan.shape[1:]) != (nb, r):
        raise _shape_error("random_plan", plan, f"[H or 1, num_blocks, random_blocks]=[{H} or 1, {nb}, {r}]")
    if plan.is_floating_point() or plan.dtype == torch.bool:
        raise ValueError(f"sparse_attention: random_plan has dtype {plan.dtype}, expected integers")
    if plan.numel() and not torch.compiler.is_compiling() and (int(plan.min()) < -1 or int(plan.max()) >= nb):
        raise ValueError(
            f"sparse_attention: random_plan holds blocks outside [-1, {nb}) (min {int(plan.min())}, max "
            f"{int(plan.max())})"
        )
    return plan.to(device=device, dtype=torch.long)


def _backend(backend: str | None, device: torch.device) -> str:
    """``naive``, ``torch`` or ``flex`` (``triton`` runs ``torch``: there is no hand-written Triton form)."""
    name = resolve_backend("sparse_attention", backend, device, extra=("flex",), cuda_default=CUDA_DEFAULT)
    return "torch" if name == "triton" else name


def flex_unsupported(device: torch.device, needs_grad: bool, dropout: float) -> str | None:
    """Why FlexAttention cannot run this call (it then runs ``torch``), or None when it can."""
    if dropout > 0:
        return "dropout on the attention weights"
    if needs_grad and not flex.supports_grad(device):
        return f"gradients on {device.type} (PyTorch's FlexAttention is forward-only there)"
    return None


def _route_flex(tensors, dropout: float) -> str:
    """``flex``, or ``torch`` for what FlexAttention cannot do (logged once per reason)."""
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    reason = flex_unsupported(tensors[0].device, needs_grad, dropout)
    if reason is None:
        return "flex"
    if reason not in _routed and not torch.compiler.is_compiling():
        _routed.add(reason)
        logger.info("zoo.ops.sparse_attention: flex backend: %s runs the torch backend", reason)
    return "torch"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    *,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    global_q: torch.Tensor | None = None,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
    random_plan: torch.Tensor | None = None,
    dropout: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of every query over the keys ``pattern`` allows.

    Args:
        q, k: [B, T, H, D]. v: [B, T, H, Dv].
        pattern: the window, causality and static global positions.
        global_mask: [B, T], nonzero at each example's global tokens (added to ``pattern.global_tokens``).
        key_padding_mask: [B, T], nonzero at real tokens; padding keys are never attended. A query left with no
            key at all (padding in a causal pattern) outputs zeros.
        segment_ids: [B, T] integers; a query attends only keys of its own segment (packed documents).
        global_q, global_k, global_v: the projections global queries use instead of q, k, v (Longformer's
            ``query_global``/``key_global``/``value_global``): a global query i attends with ``global_q[i]`` over
            ``global_k`` and ``global_v`` at every key; local queries still reach global keys through k and v.
        scale: multiplies the scores; defaults to D ** -0.5.
        dropout: dropout probability on the attention weights (pass 0 outside training).
        block_size: queries per block of the ``torch`` form (default ``pattern.block_size``, else from the window);
            a block layout is tiled by its own ``pattern.block_size``.
        random_plan: a block layout's random blocks, ``(H or 1, num_blocks, random_blocks)`` integer block indices
            (``-1``: none; rows of global query blocks are ignored); default ``pattern.random_plan``.
        backend: ``naive``, ``torch`` or ``flex`` (``triton`` runs ``torch``: no hand-written Triton form);
            default from ``ZOO_BACKEND``, else ``torch``. ``flex`` runs
            ``torch`` for dropout and for gradients on the CPU.

    Returns:
        out [B, T, H, Dv] in the dtype of v.
    """
    _validate(q, k, v, pattern, global_q, global_k, global_v)
    B, T, H, D = q.shape
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"sparse_attention: block_size={block_size!r}, expected a positive integer")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"sparse_attention: dropout={dropout!r}, expected a probability in [0, 1)")
    if scale is None:
        scale = D**-0.5
    is_global = _token_mask("global_mask", global_mask, B, T, q.device)
    static = pattern.static_global_mask(T, q.device)
    if static is not None:
        is_global = static.expand(B, T) if is_global is None else is_global | static
    key_padding_mask = _token_mask("key_padding_mask", key_padding_mask, B, T, q.device)
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, T):
            raise _shape_error("segment_ids", segment_ids, f"[B, T]=[{B}, {T}]")
        if segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
            raise ValueError(
                f"sparse_attention: segment_ids has dtype {segment_ids.dtype}, expected integers"
            )
    if pattern.is_block_layout:
        extra = [
            name
            for name, x in (
                ("global_mask", global_mask),
                ("segment_ids", segment_ids),
                ("global_q", global_q),
            )
            if x is not None
        ]
        if extra:
            raise ValueError(
                f"sparse_attention: {extra[0]} with a block layout (window_blocks >= 1): its global blocks are part of "
                "the pattern, and packed documents go in rows of their own"
            )
        if block_size is not None and block_size != pattern.block_size:
            raise ValueError(
                f"sparse_attention: block_size={block_size} differs from the block layout's pattern.block_size="
                f"{pattern.block_size}"
            )
        key_padding_mask = _token_mask("key_padding_mask", key_padding_mask, B, T, q.device)
        if T == 0:
            return v.new_zeros(B, 0, H, v.shape[-1])
        plan = _check_plan(random_plan, pattern, pattern.num_blocks(T), H, q.device)
        name = _backend(backend, q.device)
        if name == "flex":
            name = _route_flex((q, k, v), dropout)
        if name == "flex":
            return flex.flex_block_sparse_attention(
                q, k, v, pattern, scale, key_padding_mask, plan, compiled=flex.can_compile(q.device, q.dtype)
            )
        fn = naive.naive_block_sparse_attention if name == "naive" else chunk.chunk_block_sparse_attention
        return fn(q, k, v, pattern, scale, key_padding_mask, plan, dropout=dropout)
    if random_plan is not None:
        raise ValueError("sparse_attention: random_plan is for a block layout (window_blocks >= 1)")
    args = (q, k, v, pattern, scale, is_global, key_padding_mask, segment_ids, global_q, global_k, global_v)
    if T == 0:
        return v.new_zeros(B, 0, H, v.shape[-1])
    name = _backend(backend, q.device)
    if name == "flex":
        name = _route_flex((q, k, v, global_q, global_k, global_v), dropout)
    if name == "flex":
        return flex.flex_sparse_attention(*args, compiled=flex.can_compile(q.device, q.dtype))
    if name == "naive":
        return naive.naive_sparse_attention(*args, dropout=dropout)
    return chunk.chunk_sparse_attention(*args, block_size=block_size, dropout=dropout)


def sparse_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    *,
    past_len: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    q_index: torch.Tensor | None = None,
    k_index: torch.Tensor | None = None,
    random_plan: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoding with a key/value cache under a causal window pattern (O(w) per token), or a causal block layout
    (every key kept; the rows of the dense pattern, O(T) per token).

    Args:
        q: [B, Tq, H, D], the tokens at positions ``past_len ... past_len + Tq - 1``.
        k, v: [B, Tk, H, D], the keys and values of positions ``past_len + Tq - Tk ... past_len + Tq - 1`` (the
            cached window followed by the new tokens; older keys may have been dropped).
        pattern: causal, without global tokens.
        key_padding_mask: [B, Tk] over the same positions as k, nonzero at real tokens.
        q_index, k_index: block layouts only: [B or 1, Tq] and [B or 1, Tk], the places of the tokens in the
            layout (default: their positions, ``past_len ...`` and ``0 ...``; a model whose layout skips padding
            passes the positions that count real tokens). k must then hold every key (``Tk = past_len + Tq``).
        random_plan: block layouts only: as in ``sparse_attention``, over the blocks up to the last query's.

    Returns:
        out [B, Tq, H, Dv], equal to the rows of the full ``sparse_attention`` at those positions.
    """
    if isinstance(pattern, SparsePattern) and pattern.causal and pattern.is_block_layout:
        return _block_step(q, k, v, pattern, past_len, key_padding_mask, scale, q_index, k_index, random_plan)
    if not isinstance(pattern, SparsePattern) or not pattern.causal or pattern.global_tokens:
        raise ValueError("sparse_attention_step: decoding needs a causal SparsePattern without global tokens")
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise _shape_error("k", k, f"[B, Tk, H, D] with B, H, D of q {list(q.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise _shape_error("v", v, f"[B, Tk, H, Dv]=[{', '.join(map(str, k.shape[:3]))}, Dv]")
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    if Tk < Tq or past_len < 0 or Tk > past_len + Tq:
        raise ValueError(
            f"sparse_attention_step: {Tk} keys for {Tq} queries after past_len={past_len}, expected "
            f"{Tq} <= Tk <= past_len + Tq"
        )
    if scale is None:
        scale = D**-0.5
    q_pos = torch.arange(past_len, past_len + Tq, device=q.device)[:, None]
    k_pos = torch.arange(past_len + Tq - Tk, past_len + Tq, device=q.device)[None, :]
    allowed = pattern.window_mask(q_pos, k_pos)[None]  # (1, Tq, Tk)
    key_padding_mask = _token_mask("key_padding_mask", key_padding_mask, B, Tk, q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.einsum("bihd,bjhd->bhij", q, k).to(acc) * scale
    probs = masked_softmax(scores, allowed[:, None]).to(v.dtype)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def _block_step(q, k, v, pattern, past_len, key_padding_mask, scale, q_index, k_index, random_plan):
    """``sparse_attention_step`` for a causal block layout: the rows of the dense count matrix."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    if (
        k.dim() != 4
        or k.shape[0] != B
        or k.shape[2:] != q.shape[2:]
        or tuple(v.shape[:3]) != tuple(k.shape[:3])
    ):
        raise _shape_error("k", k, f"[B, Tk, H, D] with B, H, D of q {list(q.shape)}")
    if Tk != past_len + Tq:
        raise ValueError(
            f"sparse_attention_step: a block layout needs every key: got {Tk} keys, expected past_len + Tq = "
            f"{past_len + Tq}"
        )
    if q_index is None:
        q_index = torch.arange(past_len, past_len + Tq, device=q.device)[None]
    if k_index is None:
        k_index = torch.arange(Tk, device=q.device)[None]
    nb = pattern.num_blocks(int(q_index.max()) + 1) if q_index.numel() else 1
    plan = _check_plan(random_plan, pattern, nb, H, q.device)
    counts = naive.block_counts(pattern, q_index.to(q.device), k_index.to(q.device), nb, plan)
    key_padding_mask = _token_mask("key_padding_mask", key_padding_mask, B, Tk, q.device)
    if key_padding_mask is not None:
        counts = counts * key_padding_mask[:, None, None, :]
    return naive.attend_counts(q, k, v, counts, D**-0.5 if scale is None else scale, 0.0)
