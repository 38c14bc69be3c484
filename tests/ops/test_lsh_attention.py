"""lsh_attention / local_attention: the sorted, chunked ``torch`` form against the dense ``naive`` oracle (outputs
and every gradient), over hash rounds, chunk windows, causal and not, padding and packed segments; and the hashing
itself against its definition."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.ops.harness import TOLERANCE, check_forward_backward
from zoo.ops.lsh_attention import hash_buckets, local_attention, lsh_attention, random_rotations


def make_inputs(B, T, H=2, D=8, *, pad=None, segments=None, seed=0, local=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(B, T, H, D, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = dict(q=rand(), k=rand(), v=rand()) if local else dict(qk=rand(), v=rand())
    if pad is not None:
        mask = torch.ones(B, T, dtype=torch.long)
        for b, n in enumerate(pad):
            if n:
                mask[b, T - n :] = 0
        inputs["key_padding_mask"] = mask
    if segments is not None:
        inputs["segment_ids"] = torch.cat([torch.full((n,), i) for i, n in enumerate(segments)])[None].expand(
            B, T
        )
    return inputs


def lsh(backend, **kw):
    return functools.partial(lsh_attention, backend=backend, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "T, chunk, num_hashes, num_buckets, before, after",
    [
        (32, 4, 1, 8, 1, 0),
        (32, 4, 3, 8, 1, 0),  # several rounds: windows cross from one round's order into the next
        (24, 8, 2, 4, 1, 1),  # look-ahead too
        (16, 4, 2, [2, 4], 2, 0),  # a factorised hash, two chunks back
        (12, 4, 2, 6, 0, 0),  # no neighbours
        (8, 4, 4, 4, 3, 2),  # windows wider than the chunks of a round: slots counted more than once
        (7, 8, 2, 4, 1, 0),  # shorter than a chunk: plain attention
    ],
)
def test_lsh_forward_backward(T, chunk, num_hashes, num_buckets, before, after, causal):
    H, D = 2, 8
    rot = random_rotations(H, D, num_hashes, num_buckets, seed=T, dtype=torch.float64)
    kw = dict(
        rotations=rot,
        num_buckets=num_buckets,
        chunk_length=chunk,
        num_chunks_before=before,
        num_chunks_after=after,
        causal=causal,
    )
    inputs = make_inputs(2, T, H, D, seed=T)
    check_forward_backward(
        lsh("torch", **kw), lsh("naive", **kw), inputs, what=f"T={T} c={chunk} n={num_hashes}"
    )


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_padding_and_segments(causal):
    H, D, T = 2, 8, 24
    rot = random_rotations(H, D, 2, 4, seed=1, dtype=torch.float64)
    kw = dict(rotations=rot, num_buckets=4, chunk_length=4, causal=causal)
    inputs = make_inputs(3, T, H, D, pad=[0, 5, 11], segments=[7, 10, 7], seed=3)
    check_forward_backward(lsh("torch", **kw), lsh("naive", **kw), inputs, what="padding + segments")


def test_lsh_float32_with_given_buckets():
    """float32 against the float64 oracle, with the buckets fixed (hashing in two precisions may differ at ties).

    Not causal and without padding: a query left with only its own position (scored -1e5) that its window holds
    twice has ``lse = -1e5 + log 2``, which float32 rounds to 1/128, so its weights sum to 1 +- 0.4% in the
    chunked form (as in transformers' Reformer, whose arithmetic this keeps); float64 and the oracle are exact."""
    H, D, T = 2, 8, 32
    inputs = make_inputs(2, T, H, D, seed=5)
    rot = random_rotations(H, D, 2, 8, seed=2, dtype=torch.float64)
    buckets = hash_buckets(inputs["qk"], rot, 8)
    kw = dict(buckets=buckets, num_buckets=8, chunk_length=8, causal=False)
    check_forward_backward(
        lsh("torch", **kw), lsh("naive", **kw), inputs, dtype=torch.float32, tol=TOLERANCE[torch.float32]
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "T, chunk, before, after", [(32, 4, 1, 0), (24, 8, 1, 1), (12, 4, 2, 0), (5, 8, 1, 0)]
)
def test_local_forward_backward(T, chunk, before, after, causal):
    kw = dict(chunk_length=chunk, num_chunks_before=before, num_chunks_after=after, causal=causal)
    inputs = make_inputs(2, T, pad=[0, 3], segments=[T // 2, T - T // 2], local=True, seed=T)
    check_forward_backward(
        functools.partial(local_attention, backend="torch", **kw),
        functools.partial(local_attention, backend="naive", **kw),
        inputs,
        what=f"local T={T} c={chunk}",
    )


def test_hash_buckets_definition():
    """A bucket is the argmax of [xR, -xR] (factor by factor, combined as digits); padding goes after them all."""
    g = torch.Generator().manual_seed(0)
    qk = torch.randn(1, 10, 1, 4, generator=g, dtype=torch.float64)
    rot = torch.randn(1, 4, 1, 3, generator=g, dtype=torch.float64)  # factors 2 and 4: 1 + 2 columns
    mask = torch.ones(1, 10)
    mask[0, -2:] = 0
    got = hash_buckets(qk, rot, [2, 4], mask)[0, 0, 0]
    for t in range(8):
        proj = qk[0, t, 0] @ rot[0, :, 0]
        first = int(torch.argmax(torch.stack([proj[0], -proj[0]])))
        second = int(torch.argmax(torch.cat([proj[1:], -proj[1:]])))
        assert int(got[t]) == first + 2 * second
    assert got[-2:].tolist() == [8, 8]


def test_rotations_are_seeded_without_global_state():
    state = torch.random.get_rng_state()
    a = random_rotations(2, 4, 3, 8, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, random_rotations(2, 4, 3, 8, seed=7)) and a.shape == (2, 4, 3, 4)


def test_self_only_when_nothing_else():
    """The first token of a causal sequence has only itself: it attends itself. Later tokens never do while any
    other key is allowed: the output then has no component of the own value (checked with one-hot values)."""
    T, H, D = 8, 1, 4
    qk = torch.randn(1, T, H, D, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64)[None, :, None, :]
    out = lsh_attention(
        qk, v, num_buckets=2, chunk_length=8, buckets=torch.zeros(1, 1, 1, T, dtype=torch.long), causal=True
    )
    assert torch.allclose(out[0, 0, 0, 0], torch.tensor(1.0, dtype=torch.float64))
    assert out[0, :, 0].diagonal()[1:].abs().max() < 1e-30


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_length=5), "multiple"),
        (dict(num_buckets=3), "num_buckets"),
        (dict(rotations=None), "exactly one"),
        (dict(key_padding_mask=torch.ones(2, 3)), "key_padding_mask"),
        (dict(rotations=torch.zeros(2, 8, 1, 3)), "rotations"),
    ],
)
def test_bad_input_is_a_value_error(kwargs, match):
    qk, v = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    base = dict(num_buckets=4, chunk_length=4, rotations=torch.zeros(2, 8, 1, 2))
    with pytest.raises(ValueError, match=match):
        lsh_attention(qk, v, **{**base, **kwargs})


# The Triton form (under the CPU interpreter here: tiny sizes) in float32 against the float64 oracle.
@pytest.mark.parametrize(
    "T, chunk, num_hashes, before, after, causal, padded",
    [
        (32, 8, 2, 1, 0, False, False),
        (32, 8, 2, 1, 0, True, False),
        (16, 8, 1, 1, 1, False, False),  # a window of 3 over 2 chunks: a chunk attended twice
        (48, 16, 2, 1, 1, False, True),  # several rounds, look-ahead, padding and segments
        (32, 8, 2, 1, 0, True, True),
        (7, 16, 2, 1, 0, True, True),  # shorter than a chunk: plain attention
    ],
)
def test_triton_lsh_forward_backward(T, chunk, num_hashes, before, after, causal, padded):
    H, D = 2, 8
    rot = random_rotations(H, D, num_hashes, 4, seed=T, dtype=torch.float64)
    inputs = make_inputs(
        2, T, H, D, seed=T, **(dict(pad=[0, 5], segments=[T // 3, T - T // 3]) if padded else {})
    )
    # hashed once in float64: hashing in two precisions may differ at ties
    buckets = hash_buckets(inputs["qk"], rot, 4, inputs.get("key_padding_mask"))
    kw = dict(
        buckets=buckets,
        num_buckets=4,
        chunk_length=chunk,
        num_chunks_before=before,
        num_chunks_after=after,
        causal=causal,
    )
    check_forward_backward(
        lsh("triton", **kw),
        lsh("naive", **kw),
        inputs,
        dtype=torch.float32,
        what=f"triton lsh T={T} c={chunk}",
    )


@pytest.mark.parametrize(
    "T, chunk, before, after, causal, padded",
    [
        (32, 8, 1, 0, True, True),
        (32, 16, 1, 1, False, True),
        (24, 8, 2, 0, False, False),
        (5, 8, 1, 0, True, False),
    ],
)
def test_triton_local_forward_backward(T, chunk, before, after, causal, padded):
    kw = dict(chunk_length=chunk, num_chunks_before=before, num_chunks_after=after, causal=causal)
    extra = dict(pad=[0, 3], segments=[T // 2, T - T // 2]) if padded else {}
    inputs = make_inputs(2, T, local=True, seed=T, **extra)
    check_forward_backward(
        functools.partial(local_attention, backend="triton", **kw),
        functools.partial(local_attention, backend="naive", **kw),
        inputs,
        dtype=torch.float32,
        what=f"triton local T={T} c={chunk}",
    )


def test_triton_backend_launches_the_kernels():
    """backend="triton" runs the kernels (forward, dq, dk/dv), and with attention dropout the torch form."""
    from tests.ops.harness import record_triton_launches

    inputs = make_inputs(1, 16, seed=0)
    rot = random_rotations(2, 8, 1, 4, seed=0, dtype=torch.float64)
    kw = dict(rotations=rot, num_buckets=4, chunk_length=8, backend="triton")
    qk, v = (x.float().requires_grad_() for x in (inputs["qk"], inputs["v"]))
    launches = record_triton_launches(lambda: lsh_attention(qk, v, **kw).sum().backward())
    assert {launch.kernel for launch in launches} == {
        "_chunk_attn_fwd_kernel",
        "_chunk_attn_dq_kernel",
        "_chunk_attn_dkv_kernel",
    }
    assert record_triton_launches(lambda: lsh_attention(qk, v, dropout=0.1, **kw)) == []


def _padded(x, length, value=0):
    """x (B, T, ...) padded along time to ``length`` with ``value``."""
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


@pytest.mark.parametrize(
    "chunk, num_hashes, num_buckets, before, after",
    [
        (4, 1, 8, 1, 0),
        (4, 3, 8, 1, 0),  # windows crossing from one round's order into the next
        (4, 2, [2, 4], 2, 0),  # a factorised hash, two chunks back
        (4, 4, 4, 3, 1),  # windows wider than a round: slots counted more than once; a look-ahead chunk
    ],
)
def test_lsh_step_is_the_last_row_of_the_forward(chunk, num_hashes, num_buckets, before, after):
    """Decoding: for every prefix length t, the step's row of token t - 1 equals that row of the naive causal
    forward over the prefix padded (masked) to a multiple of the chunk, with the same buckets; a left-padded row
    (masked keys hashed to the padding bucket) included."""
    from zoo.ops.lsh_attention import lsh_attention_step

    H, D, T = 2, 8, 22
    total = 8  # prod(num_buckets) of every case: the padding bucket
    rot = random_rotations(H, D, num_hashes, num_buckets, seed=5, dtype=torch.float64)
    inputs = make_inputs(2, T, H, D, seed=9)
    qk, v = inputs["qk"], inputs["v"]
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0
    for t in range(4, T + 1):
        length = t if t <= chunk else -(-t // chunk) * chunk
        m = mask[:, :t]
        buckets = hash_buckets(qk[:, :t], rot, num_buckets, m)
        got = lsh_attention_step(
            qk[:, :t],
            v[:, :t],
            buckets,
            padded_length=length,
            num_buckets_total=total,
            chunk_length=chunk,
            num_chunks_before=before,
            num_chunks_after=after,
            key_padding_mask=m,
        )
        full = lsh_attention(
            _padded(qk[:, :t], length),
            _padded(v[:, :t], length),
            rotations=rot,
            num_buckets=num_buckets,
            chunk_length=chunk,
            num_chunks_before=before,
            num_chunks_after=after,
            causal=True,
            key_padding_mask=_padded(m, length),
            backend="naive",
        )
        want = full[:, t - 1 : t]
        assert ((got - want).norm() / want.norm()).item() < TOLERANCE[torch.float64], f"t={t}"


def test_local_step_equals_the_forward_rows():
    """Decoding local attention: new rows (one and three at a time) read only the window's keys and equal the
    naive causal forward's rows over the whole sequence."""
    from zoo.ops.lsh_attention import local_attention_step

    T, chunk = 20, 4
    inputs = make_inputs(2, T, seed=3, local=True)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :2] = 0
    full = local_attention(
        q, k, v, chunk_length=chunk, num_chunks_before=1, causal=True, key_padding_mask=mask, backend="naive"
    )
    for start, n in [(t, 1) for t in range(2, T)] + [(5, 3), (13, 3)]:
        got = local_attention_step(
            q[:, start : start + n],
            k[:, : start + n],
            v[:, : start + n],
            past_length=start,
            chunk_length=chunk,
            num_chunks_before=1,
            key_padding_mask=mask[:, : start + n],
        )
        want = full[:, start : start + n]
        assert ((got - want).norm() / want.norm()).item() < TOLERANCE[torch.float64], f"t={start}"
