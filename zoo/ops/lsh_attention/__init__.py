"""LSH attention and local (chunked) attention: Reformer's two attention patterns.

Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer", arXiv:2001.04451) shares one projection between
queries and keys (keys are the unit-normalised query-keys), hashes it with random rotations into buckets in several
rounds, sorts each round's tokens by bucket and attends within chunks of the sorted order, with look-back /
look-ahead chunks. A query never attends its own position unless nothing else is allowed (``-1e5`` against ``-1e9``
for masked keys), and the rounds are combined by the softmax of their log-sum-exp. Local attention chunks positions
instead of buckets (separate q and k, no self rule). Inputs no longer than one chunk get plain attention.

- ``naive``: dense T x T count matrices built from ranks (``naive.py``), the oracle;
- ``torch``: sorted chunks, O(n * T * c) memory (``chunk.py``), the CPU path and the fallback;
- ``triton``: the attention over the sorted chunks as Triton kernels, forward and backward (``triton.py``; hashing
  and sorting stay in PyTorch); with attention dropout it runs ``torch``;
- ``lsh_attention_step`` / ``local_attention_step`` (``step.py``): the last token's causal row for decoding, O(T)
  and O(chunk) work, equal to that row of the forward.

Lengths above ``chunk_length`` must be a multiple of it (the model pads, as transformers' Reformer does). Hashing
takes ``rotations`` (a tensor, so that hashing is reproducible on any device; see :func:`random_rotations`) or
precomputed ``buckets`` (a reversible backward reuses its forward's).

    rot = random_rotations(H, D, num_hashes=2, num_buckets=8, seed=0)
    out = lsh_attention(qk, v, rotations=rot, num_buckets=8, chunk_length=64, causal=True, key_padding_mask=m)
    out = local_attention(q, k, v, chunk_length=64, num_chunks_before=1, causal=True)
"""

from __future__ import annotations

import torch

from zoo.ops.dispatch import resolve_backend
from zoo.ops.lsh_attention import chunk, naive
from zoo.ops.lsh_attention.hashing import bucket_factors, hash_buckets, random_rotations, rotation_size
from zoo.ops.lsh_attention.step import local_attention_step, lsh_attention_step

__all__ = [
    "hash_buckets",
    "local_attention",
    "local_attention_step",
    "lsh_attention",
    "lsh_attention_step",
    "random_rotations",
]


def _check_4d(name, x, like=None):
    if x.dim() != 4:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [B, T, H, D]")
    if like is not None and tuple(x.shape[:3]) != tuple(like.shape[:3]):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected [B, T, H] = {list(like.shape[:3])} first"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}, expected a floating dtype")


def _check_common(op, T, B, chunk_length, before, after, key_padding_mask, segment_ids, dropout):
    if not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"{op}: chunk_length={chunk_length!r}, expected a positive integer")
    for name, val in (("num_chunks_before", before), ("num_chunks_after", after)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{op}: {name}={val!r}, expected a non-negative integer")
    if T > chunk_length and T % chunk_length:
        raise ValueError(
            f"{op}: sequence length {T} is longer than chunk_length={chunk_length} but not a multiple of it; pad "
            f"to {-(-T // chunk_length) * chunk_length}"
        )
    for name, m in (("key_padding_mask", key_padding_mask), ("segment_ids", segment_ids)):
        if m is not None and tuple(m.shape) != (B, T):
            raise ValueError(f"{op}: {name} has shape {tuple(m.shape)}, expected [B, T]=[{B}, {T}]")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: dropout={dropout!r}, expected a probability in [0, 1)")


def _pick(backend, device, op):
    """The form of ``op`` (``lsh_attention`` or ``local_attention``) the backend names."""
    name = resolve_backend("lsh_attention", backend, device)
    if name == "triton":
        from zoo.ops.lsh_attention import triton as kernels

        return getattr(kernels, f"triton_{op}")
    if name == "naive":
        return getattr(naive, f"naive_{op}")
    return getattr(chunk, f"chunk_{op}")


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    num_buckets: int | list[int],
    chunk_length: int,
    rotations: torch.Tensor | None = None,
    buckets: torch.Tensor | None = None,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    dropout: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Shared-QK attention within hashed, sorted chunks.

    Args:
        qk: [B, T, H, D], the shared query-key projection (queries as they are, keys unit-normalised).
        v: [B, T, H, Dv].
        num_buckets: an even bucket count, or a list of even factors (a factorised hash).
        chunk_length: slots per chunk of the sorted order; T above it must be a multiple of it.
        rotations: [H, D, num_hashes, sum(num_buckets) / 2] random rotations; or pass ``buckets``.
        buckets: [B, H, num_hashes, T] precomputed buckets (padding tokens in bucket ``prod(num_buckets)``).
        num_chunks_before, num_chunks_after: neighbouring chunks each chunk attends (wrapping around).
        causal: a query attends only keys at its position or before.
        key_padding_mask: [B, T], nonzero at real tokens; padding keys are masked and hashed to a bucket of
            their own after the others.
        segment_ids: [B, T] integers; a query attends only keys of its own segment (packed documents).
        dropout: on the attention weights (0 outside training).
        backend: ``naive``, ``torch`` or ``triton`` (default: see ``zoo.ops.dispatch``).

    Returns:
        out [B, T, H, Dv].
    """
    _check_4d("qk", qk)
    _check_4d("v", v, qk)
    B, T, H, D = qk.shape
    _check_common(
        "lsh_attention",
        T,
        B,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        key_padding_mask,
        segment_ids,
        dropout,
    )
    bucket_factors(num_buckets)
    if (rotations is None) == (buckets is None):
        raise ValueError("lsh_attention: pass exactly one of rotations or buckets")
    if rotations is not None:
        want = (H, D, rotation_size(num_buckets))
        if rotations.dim() != 4 or (rotations.shape[0], rotations.shape[1], rotations.shape[3]) != want:
            raise ValueError(
                f"lsh_attention: rotations has shape {tuple(rotations.shape)}, expected [H, D, num_hashes, "
                f"sum(num_buckets)/2] = [{H}, {D}, num_hashes, {want[2]}]"
            )
        buckets = hash_buckets(qk, rotations, num_buckets, key_padding_mask)
    elif buckets.dim() != 4 or buckets.shape[0] != B or buckets.shape[1] != H or buckets.shape[3] != T:
        raise ValueError(
            f"lsh_attention: buckets has shape {tuple(buckets.shape)}, expected [B, H, num_hashes, T]=[{B}, {H}, "
            f"num_hashes, {T}]"
        )
    if T == 0:
        return v.new_zeros(B, 0, H, v.shape[-1])
    fn = _pick(backend, qk.device, "lsh_attention")
    return fn(
        qk,
        v,
        buckets,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        key_padding_mask,
        segment_ids,
        dropout,
    )


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_length: int,
    num_chunks_before: int = 1,
    num_chunks_after: int = 0,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    dropout: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within chunks of ``chunk_length`` positions and their neighbouring chunks (Reformer's local
    layers). q, k: [B, T, H, D], v: [B, T, H, Dv]; the scores are ``q . k / sqrt(D)``; other arguments as in
    :func:`lsh_attention`. Returns out [B, T, H, Dv]."""
    _check_4d("q", q)
    _check_4d("k", k, q)
    _check_4d("v", v, q)
    if k.shape != q.shape:
        raise ValueError(
            f"local_attention: k has shape {tuple(k.shape)}, expected the shape of q {tuple(q.shape)}"
        )
    B, T, H, D = q.shape
    _check_common(
        "local_attention",
        T,
        B,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        key_padding_mask,
        segment_ids,
        dropout,
    )
    if T == 0:
        return v.new_zeros(B, 0, H, v.shape[-1])
    fn = _pick(backend, q.device, "local_attention")
    return fn(
        q,
        k,
        v,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        key_padding_mask,
        segment_ids,
        dropout,
    )
