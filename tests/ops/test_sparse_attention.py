"""sparse_attention: the blocked ``torch`` form against the dense ``naive`` oracle (outputs and every gradient),
and decoding over a cached window against the full forward."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.ops.harness import TOLERANCE, check_forward_backward, rel_err
from zoo.ops.sparse_attention import SparsePattern, sparse_attention, sparse_attention_step

naive = functools.partial(sparse_attention, backend="naive")


def blocked(block_size=None):
    return functools.partial(sparse_attention, backend="torch", block_size=block_size)


def make_inputs(
    B, T, H=2, D=8, *, pattern, global_rows=None, pad=None, segments=None, own_global=False, seed=0
):
    """q, k, v (and the global projections) in float64; ``global_rows``: per row, the global positions;
    ``pad``: per row, ("left" | "right", number of padding tokens); ``segments``: lengths of packed documents."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(B, T, H, D, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = dict(q=rand(), k=rand(), v=rand(), pattern=pattern)
    if own_global:
        inputs.update(global_q=rand(), global_k=rand(), global_v=rand())
    if global_rows is not None:
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, positions in enumerate(global_rows):
            mask[b, list(positions)] = True
        inputs["global_mask"] = mask
    if pad is not None:
        mask = torch.ones(B, T, dtype=torch.long)
        for b, (side, n) in enumerate(pad):
            if n:
                mask[b, :n] = 0 if side == "left" else 1
                if side == "right":
                    mask[b, T - n :] = 0
        inputs["key_padding_mask"] = mask
    if segments is not None:
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(segments)])
        inputs["segment_ids"] = ids[None].expand(B, T)
    return inputs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "T, window, block_size",
    [
        (1, 2, 4),
        (5, 2, 4),  # a length shorter than one block
        (17, 3, 4),  # odd window, wider than half a block
        (33, 4, 8),  # even window, half a block
        (40, 8, 8),  # window = block, length a multiple of the block
        (37, 11, 4),  # window spanning several blocks
        (29, 1, 16),
        (21, 30, 8),  # window longer than the sequence
        (19, None, 8),  # no window: full attention
    ],
)
def test_window_forward_backward(T, window, block_size, causal):
    pattern = SparsePattern(window=window, causal=causal)
    inputs = make_inputs(2, T, pattern=pattern)
    check_forward_backward(blocked(block_size), naive, inputs, what=f"T={T} w={window} bs={block_size}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("own_global", [False, True])
@pytest.mark.parametrize(
    "T, window, block_size, global_rows",
    [
        (24, 2, 8, [[0], [0]]),  # the first token (classification)
        (25, 3, 4, [[24], [23, 24]]),  # the end
        (30, 4, 8, [[13], [2, 14, 15, 29]]),  # the middle, different counts per row
        (18, 2, 4, [[], [0, 5]]),  # a row without global tokens
        (9, 1, 4, [[0, 1, 2, 3, 4, 5, 6, 7, 8], [4]]),  # every token global
    ],
)
def test_global_tokens(T, window, block_size, global_rows, own_global, causal):
    pattern = SparsePattern(window=window, causal=causal)
    inputs = make_inputs(2, T, pattern=pattern, global_rows=global_rows, own_global=own_global)
    check_forward_backward(blocked(block_size), naive, inputs, what=f"globals {global_rows}")


@pytest.mark.parametrize("positions", [(0,), (-1,), (0, 7, -1)])
def test_static_global_tokens_equal_a_global_mask(positions):
    T = 15
    inputs = make_inputs(2, T, pattern=SparsePattern(window=2, global_tokens=positions))
    check_forward_backward(blocked(4), naive, inputs, what=f"static globals {positions}")
    as_mask = dict(inputs, pattern=SparsePattern(window=2))
    as_mask["global_mask"] = torch.zeros(2, T, dtype=torch.bool)
    as_mask["global_mask"][:, [p % T for p in positions]] = True
    assert (
        rel_err(sparse_attention(**as_mask, backend="naive"), sparse_attention(**inputs, backend="naive"))
        == 0
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("with_globals", [False, True])
def test_padding(side, causal, with_globals):
    T = 23
    pattern = SparsePattern(window=3, causal=causal)
    rows = [[0, 9], [5]] if with_globals else None
    inputs = make_inputs(
        2, T, pattern=pattern, pad=[(side, 6), (side, 0)], global_rows=rows, own_global=with_globals
    )
    check_forward_backward(blocked(8), naive, inputs, what=f"{side} padding")


def test_padded_rows_equal_unpadded_sequences():
    """The real tokens of a padded row give what the row alone gives (the oracle's masks are right)."""
    T, n = 20, 13
    pattern = SparsePattern(window=3)
    inputs = make_inputs(1, T, pattern=pattern, pad=[("right", T - n)], global_rows=[[0, 4]], own_global=True)
    alone = {
        name: (x[:, :n] if isinstance(x, torch.Tensor) and name != "key_padding_mask" else x)
        for name, x in inputs.items()
        if name != "key_padding_mask"
    }
    for backend in ("naive", "torch"):
        padded = sparse_attention(**inputs, backend=backend)[:, :n]
        assert rel_err(padded, sparse_attention(**alone, backend="naive")) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("causal", [False, True])
def test_segments_equal_separate_sequences(causal):
    lengths = [7, 12, 5]
    pattern = SparsePattern(window=4, causal=causal)
    inputs = make_inputs(
        1, sum(lengths), pattern=pattern, segments=lengths, global_rows=[[0, 9]], own_global=True
    )
    check_forward_backward(blocked(4), naive, inputs, what="segments")
    packed = sparse_attention(**inputs, backend="torch")
    start = 0
    for n in lengths:
        piece = {
            name: (x[:, start : start + n] if isinstance(x, torch.Tensor) else x)
            for name, x in inputs.items()
            if name != "segment_ids"
        }
        alone = sparse_attention(**piece, backend="naive")
        assert rel_err(packed[:, start : start + n], alone) < TOLERANCE[torch.float64]
        start += n


@pytest.mark.parametrize("causal", [False, True])
def test_float32_against_float64_oracle(causal):
    pattern = SparsePattern(window=6, causal=causal)
    inputs = make_inputs(
        2, 45, D=16, pattern=pattern, pad=[("right", 4), ("left", 3)], global_rows=[[0], [10, 44]]
    )
    check_forward_backward(blocked(), naive, inputs, dtype=torch.float32, what="float32")


def test_bfloat16_stays_near_the_oracle():
    inputs = make_inputs(1, 40, D=16, pattern=SparsePattern(window=5, causal=True))
    ref = sparse_attention(**inputs, backend="naive")
    half = {n: (x.bfloat16() if isinstance(x, torch.Tensor) else x) for n, x in inputs.items()}
    out = sparse_attention(**half, backend="torch")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("window", [3, 8])
@pytest.mark.parametrize("chunk", [1, 3])
def test_step_over_a_cached_window_equals_full(window, chunk):
    """Decoding ``chunk`` tokens at a time, keeping only the last ``window`` keys, equals the full forward."""
    T, prefix = 26, 5
    pattern = SparsePattern(window=window, causal=True)
    inputs = make_inputs(2, T, pattern=pattern, pad=[("left", 4), ("left", 0)])
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["key_padding_mask"]
    full = sparse_attention(q, k, v, pattern, key_padding_mask=mask, backend="naive")
    outs = [
        sparse_attention(
            q[:, :prefix], k[:, :prefix], v[:, :prefix], pattern, key_padding_mask=mask[:, :prefix]
        )
    ]
    for t in range(prefix, T, chunk):
        end = min(t + chunk, T)
        lo = max(0, t - window)  # the cache: the last `window` keys before t
        outs.append(
            sparse_attention_step(
                q[:, t:end], k[:, lo:end], v[:, lo:end], pattern, past_len=t, key_padding_mask=mask[:, lo:end]
            )
        )
    assert rel_err(torch.cat(outs, 1), full) < TOLERANCE[torch.float64]


def test_bad_inputs_are_value_errors():
    inputs = make_inputs(1, 8, pattern=SparsePattern(window=2))
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    pattern = inputs["pattern"]
    with pytest.raises(ValueError, match="k has shape"):
        sparse_attention(q, k[:, :5], v, pattern)
    with pytest.raises(ValueError, match="pattern is a dict"):
        sparse_attention(q, k, v, {"window": 2})
    with pytest.raises(ValueError, match="global_mask has shape"):
        sparse_attention(q, k, v, pattern, global_mask=torch.ones(1, 7))
    with pytest.raises(ValueError, match="all of global_q"):
        sparse_attention(q, k, v, pattern, global_q=q)
    with pytest.raises(ValueError, match="window=-1"):
        SparsePattern(window=-1)
    with pytest.raises(ValueError, match="random_blocks"):
        SparsePattern(window=2, random_blocks=3)
    with pytest.raises(ValueError, match="position 9"):
        sparse_attention(q, k, v, SparsePattern(window=2, global_tokens=(9,)))
    with pytest.raises(ValueError, match="causal"):
        sparse_attention_step(q, k, v, pattern, past_len=0)
    with pytest.raises(ValueError, match="backend="):
        sparse_attention(q, k, v, pattern, backend="cuda")
