"""Angular locality-sensitive hashing of Reformer (Kitaev et al. 2020, "Reformer: The Efficient Transformer",
arXiv:2001.04451, section 2), shared by every form of ``zoo.ops.lsh_attention``.

A vector x is hashed by a random rotation R (a Gaussian matrix of D x b/2 columns): its bucket is
``argmax([xR; -xR])``, one of b buckets, so that vectors at a small angle tend to share a bucket. Each hashing round
uses its own rotation. With a factorised bucket count ``(b1, b2, ...)`` the rotation's columns are split into one
group per factor, each hashed on its own, and the buckets combined as digits (``h1 + b1 * h2 + ...``).

Rotations are a tensor passed in, ``(H, D, num_hashes, sum(b_i) / 2)``, so that hashing is the same on every
device; :func:`random_rotations` draws them from a seeded generator without touching the global random state.
Padding tokens go to a bucket of their own after the others, so that they sort after every real token.
"""

from __future__ import annotations

import math

import torch


def bucket_factors(num_buckets: int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``num_buckets`` as a tuple of even factors; ValueError naming the value otherwise."""
    factors = (num_buckets,) if isinstance(num_buckets, int) else tuple(num_buckets)
    if not factors or any(not isinstance(f, int) or f < 2 or f % 2 for f in factors):
        raise ValueError(
            f"lsh_attention: num_buckets={num_buckets!r}, expected an even integer >= 2 or a list of them"
        )
    return factors


def rotation_size(num_buckets) -> int:
    """Columns a rotation needs per round: half the sum of the bucket factors."""
    return sum(bucket_factors(num_buckets)) // 2


def random_rotations(
    num_heads: int,
    head_dim: int,
    num_hashes: int,
    num_buckets,
    *,
    seed: int,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian rotations ``(H, D, num_hashes, rotation_size)`` drawn on the CPU from a generator seeded with
    ``seed`` (the same on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_heads, head_dim, num_hashes, rotation_size(num_buckets))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def hash_buckets(
    qk: torch.Tensor,
    rotations: torch.Tensor,
    num_buckets,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Buckets ``(B, H, num_hashes, T)`` of the shared query-keys ``qk`` (B, T, H, D); padding tokens (zeros of
    ``key_padding_mask``, (B, T)) get bucket ``prod(num_buckets)``. No gradient flows through hashing."""
    factors = bucket_factors(num_buckets)
    rotated = torch.einsum("bthd,hdnr->bhntr", qk.detach(), rotations.to(qk.dtype))
    buckets, start, place = None, 0, 1
    for f in factors:
        part = rotated[..., start : start + f // 2]
        digit = torch.cat([part, -part], dim=-1).argmax(dim=-1)
        buckets = digit if buckets is None else buckets + place * digit
        start, place = start + f // 2, place * f
    if key_padding_mask is not None:
        real = key_padding_mask.to(torch.bool)[:, None, None, :]
        buckets = torch.where(real, buckets, torch.full_like(buckets, math.prod(factors)))
    return buckets
