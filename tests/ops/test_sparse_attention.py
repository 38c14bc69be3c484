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


# BigBird's block layout (Zaheer et al. 2020, arXiv:2007.14062)


def bigbird(block_size, window_blocks=3, global_blocks=1, random_blocks=2, causal=False, seed=0):
    return SparsePattern(
        block_size=block_size,
        window_blocks=window_blocks,
        global_blocks=global_blocks,
        random_blocks=random_blocks,
        causal=causal,
        seed=seed,
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "T, block_size, window_blocks, global_blocks, random_blocks",
    [
        (1, 4, 3, 1, 2),  # shorter than a block
        (32, 4, 3, 1, 2),  # a multiple of the block size
        (37, 4, 3, 1, 3),  # not a multiple: the op pads the last block
        (45, 8, 5, 2, 1),  # wider window, two global blocks at each end
        (24, 4, 1, 0, 0),  # block-diagonal only
        (20, 4, 3, 1, 6),  # more random blocks than candidates (the plan holds -1)
    ],
)
def test_block_layout_forward_backward(T, block_size, window_blocks, global_blocks, random_blocks, causal):
    if causal and window_blocks % 2:
        window_blocks -= 1 if window_blocks > 1 else 0
    pattern = bigbird(block_size, window_blocks, global_blocks, random_blocks, causal)
    inputs = make_inputs(2, T, pattern=pattern, seed=T)
    check_forward_backward(blocked(), naive, inputs, what=f"bigbird T={T} bs={block_size}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_block_layout_padding(side, causal):
    pattern = bigbird(4, window_blocks=2 if causal else 3, causal=causal)
    inputs = make_inputs(2, 30, pattern=pattern, pad=[(side, 9), (side, 0)])
    check_forward_backward(blocked(), naive, inputs, what=f"bigbird {side} padding")


@pytest.mark.parametrize("heads", [1, 2])
def test_block_layout_explicit_plan_with_repeats(heads):
    """An explicit plan, per head or shared, repeating window and global blocks (transformers' eval-mode plan is
    all zeros): forms agree, and the oracle weighs a repeated block as the enumeration below does."""
    T, bs = 28, 4
    pattern = bigbird(bs, random_blocks=3)
    nb = 7
    g = torch.Generator().manual_seed(1)
    plan = torch.randint(-1, nb, (heads, nb, 3), generator=g)
    plan[0, 3] = 0  # block 0 (global) three more times
    inputs = dict(make_inputs(1, T, H=2, pattern=pattern), random_plan=plan)
    check_forward_backward(blocked(), naive, inputs, what="explicit plan")

    # the layout enumerated query by query, as the paper lists it: weights count * exp(score)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    ref = torch.zeros_like(v)
    for h in range(2):
        for i in range(T):
            n = i // bs
            count = torch.zeros(T, dtype=torch.float64)
            for j in range(T):
                m = j // bs
                if n in (0, nb - 1) or m in (0, nb - 1) or abs(n - m) <= 1:
                    count[j] = 1
            if n not in (0, nb - 1):
                for m in plan[h % heads, n].tolist():
                    if m >= 0:
                        count[m * bs : (m + 1) * bs] += 1
            s = (k[0, :, h] @ q[0, i, h]) * 8**-0.5
            w = count * torch.exp(s - s.max())
            ref[0, i, h] = (w / w.sum()) @ v[0, :, h]
    assert rel_err(sparse_attention(**inputs, backend="naive"), ref) < TOLERANCE[torch.float64]


def test_random_plan_is_seeded_and_stays_off_window_and_globals():
    state = torch.get_rng_state()
    pattern = bigbird(4, random_blocks=3, seed=5)
    plan = pattern.random_plan(12, 3)
    assert torch.equal(torch.get_rng_state(), state), "the plan touched the global random state"
    assert torch.equal(plan, bigbird(4, random_blocks=3, seed=5).random_plan(12, 3))
    assert not torch.equal(plan, bigbird(4, random_blocks=3, seed=6).random_plan(12, 3))
    assert not torch.equal(plan[0], plan[1]), "heads draw the same blocks"
    for n in range(1, 11):
        for h in range(3):
            chosen = plan[h, n].tolist()
            assert len(set(chosen)) == 3 and all(1 <= m <= 10 and abs(m - n) > 1 for m in chosen)
    causal = bigbird(4, window_blocks=2, random_blocks=2, causal=True, seed=5)
    long, short = causal.random_plan(20, 2), causal.random_plan(9, 2)
    assert torch.equal(long[:, :9], short), "a causal plan changes with the length"
    assert bool(((long < torch.arange(20)[None, :, None] - 1) | (long == -1)).all())


@pytest.mark.parametrize("chunk", [1, 3])
def test_block_step_equals_full(chunk):
    """Causal block layout: decoding over the whole cache equals the full forward (also with the layout placed
    by real-token positions under left padding)."""
    T, prefix = 27, 6
    pattern = bigbird(4, window_blocks=2, random_blocks=2, causal=True)
    inputs = make_inputs(2, T, pattern=pattern)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    full = sparse_attention(q, k, v, pattern, backend="torch")
    outs = [sparse_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], pattern)]
    for t in range(prefix, T, chunk):
        end = min(t + chunk, T)
        outs.append(sparse_attention_step(q[:, t:end], k[:, :end], v[:, :end], pattern, past_len=t))
    assert rel_err(torch.cat(outs, 1), full) < TOLERANCE[torch.float64]
    # left padding of 5, the layout counting real tokens: equals the unpadded row
    pad = 5
    qp, kp, vp = (torch.cat([torch.randn(2, pad, 2, 8, dtype=torch.float64), x], 1) for x in (q, k, v))
    mask = torch.ones(2, T + pad, dtype=torch.bool)
    mask[:, :pad] = False
    index = (mask.long().cumsum(-1) - 1).clamp(min=0)
    last = sparse_attention_step(
        qp[:, -1:], kp, vp, pattern, past_len=T + pad - 1, key_padding_mask=mask,
        q_index=index[:, -1:], k_index=index,
    )  # fmt: skip
    assert rel_err(last, full[:, -1:]) < TOLERANCE[torch.float64]


def test_block_layout_bad_inputs_are_value_errors():
    pattern = bigbird(4)
    inputs = make_inputs(1, 16, pattern=pattern)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    with pytest.raises(ValueError, match="random_plan has shape"):
        sparse_attention(q, k, v, pattern, random_plan=torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        sparse_attention(q, k, v, pattern, random_plan=torch.full((1, 4, 2), 4))
    with pytest.raises(ValueError, match="global_mask with a block layout"):
        sparse_attention(q, k, v, pattern, global_mask=torch.ones(1, 16))
    with pytest.raises(ValueError, match="random_plan is for a block layout"):
        sparse_attention(q, k, v, SparsePattern(window=2), random_plan=torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="needs block_size"):
        SparsePattern(window_blocks=3)
    with pytest.raises(ValueError, match="must be odd"):
        SparsePattern(block_size=4, window_blocks=2)
    with pytest.raises(ValueError, match="describe the layout in blocks"):
        SparsePattern(block_size=4, window_blocks=3, window=2)
    with pytest.raises(ValueError, match="every key"):
        sparse_attention_step(q, k[:, 1:], v[:, 1:], bigbird(4, 2, causal=True), past_len=15)


@pytest.mark.parametrize("layout", ["window", "window+globals", "blocks"])
def test_dropout_form_equals_the_fused_form_when_nothing_drops(layout):
    """Without dropout the torch form runs one fused attention per block; with dropout it computes the scores and
    the softmax itself. At a probability so small that nothing is dropped, the two agree (outputs and gradients)."""
    if layout == "blocks":
        pattern = SparsePattern(block_size=4, window_blocks=3, global_blocks=1, random_blocks=2)
        inputs = make_inputs(2, 37, pattern=pattern, pad=[("left", 5), ("right", 0)])
    else:
        pattern = SparsePattern(window=6)
        rows = [[0, 9], [3]] if layout == "window+globals" else None
        inputs = make_inputs(2, 37, pattern=pattern, global_rows=rows, pad=[("right", 4), ("right", 0)])
    leaves = [inputs[name].requires_grad_() for name in ("q", "k", "v")]
    results = []
    for dropout in (0.0, 1e-12):
        torch.manual_seed(0)
        out = sparse_attention(**inputs, dropout=dropout, backend="torch", block_size=4 if layout == "blocks" else 8)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results.append((out, *grads))
    for fused, explicit in zip(*results):
        assert rel_err(fused, explicit) < 1e-10  # the kept weights are scaled by 1 / (1 - 1e-12)
