"""sparse_attention's ``flex`` backend (FlexAttention with a block mask) against the dense ``naive`` oracle.

Three things are checked separately, because FlexAttention's unfused reference applies the ``mask_mod`` to every
score and ignores the block mask, while its compiled kernel trusts the block mask and skips tiles:

- the mask and score modifications, forward and every gradient, in float64 through the unfused reference (PyTorch
  refuses inputs that require grad on the CPU; the tests lift that guard, as the op itself never does);
- the block mask: every pair the pattern allows lies in a tile the mask keeps, every tile marked full holds only
  allowed pairs (each counted once), and tiles are skipped;
- the compiled kernel's forward in float32 on a window/global case and a BigBird layout.

And the routing: what FlexAttention cannot do (dropout, gradients on the CPU) runs the ``torch`` form.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from tests.ops.harness import TOLERANCE, check_forward_backward, rel_err
from tests.ops.test_sparse_attention import bigbird, make_inputs
from zoo.ops.dispatch import resolve_backend
from zoo.ops.sparse_attention import SparsePattern, chunk, flex, naive, sparse_attention
from zoo.ops.sparse_attention import _backend as sparse_backend

oracle = functools.partial(sparse_attention, backend="naive")
flex_op = functools.partial(sparse_attention, backend="flex")


@pytest.fixture
def flex_grads_on_cpu(monkeypatch):
    """Let FlexAttention's unfused reference differentiate on the CPU (its math backward; the CPU guard is an
    input check in the frontend)."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args: None)
    monkeypatch.setattr(flex, "supports_grad", lambda device: True)


WINDOW_CASES = {
    "window even": dict(T=150, window=8),
    "no window": dict(T=90, window=None),
    "globals start/middle/end, own projections": dict(
        T=140, window=5, global_rows=[[0, 70], [139]], own_global=True
    ),
    "globals, shared projections, padding": dict(
        T=133, window=4, global_rows=[[0], [2, 64]], pad=[("right", 30), ("left", 9)]
    ),
    "segments with a global": dict(T=100, window=6, B=1, segments=[30, 50, 20], global_rows=[[40]]),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_forward_backward(case, causal, flex_grads_on_cpu):
    spec = dict(WINDOW_CASES[case])
    T, window, B = spec.pop("T"), spec.pop("window"), spec.pop("B", 2)
    inputs = make_inputs(B, T, pattern=SparsePattern(window=window, causal=causal), **spec)
    check_forward_backward(flex_op, oracle, inputs, what=f"flex {case}")


LAYOUT_CASES = {
    "shorter than a block": dict(T=3, bs=4, W=3, g=1, r=2),
    "blocks of 4, padded last block": dict(T=37, bs=4, W=3, g=1, r=3),
    "blocks of 16, two global blocks": dict(T=150, bs=16, W=5, g=2, r=1),
    "blocks of 48 across tiles, padding": dict(T=200, bs=48, W=3, g=1, r=2, pad=True),
    "no random blocks": dict(T=70, bs=8, W=3, g=1, r=0),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_forward_backward(case, causal, flex_grads_on_cpu):
    c = LAYOUT_CASES[case]
    W = c["W"] - 1 if causal else c["W"]
    pad = [("right", 11), ("left", 5)] if c.get("pad") else None
    inputs = make_inputs(2, c["T"], pattern=bigbird(c["bs"], W, c["g"], c["r"], causal), pad=pad, seed=c["T"])
    check_forward_backward(flex_op, oracle, inputs, what=f"flex {case}")


@pytest.mark.parametrize("plan_kind", ["eval (all block 0)", "per head, with repeats"])
def test_layout_repeated_blocks_are_counted(plan_kind, flex_grads_on_cpu):
    """transformers' eval-mode plan points every random block at block 0, which then weighs 1 + r times in the
    softmax: FlexAttention adds log(count) to the score, forward and gradients equal the oracle's weighting."""
    T, bs, r = 70, 8, 3
    nb = -(-T // bs)
    if plan_kind.startswith("eval"):
        plan = torch.zeros(1, nb, r, dtype=torch.long)
    else:
        plan = torch.randint(-1, nb, (2, nb, r), generator=torch.Generator().manual_seed(3))
        plan[1, 4] = torch.tensor([3, 3, 0])  # the window's own block twice, then block 0
    inputs = dict(make_inputs(2, T, pattern=bigbird(bs, random_blocks=r), pad=[("right", 6), ("right", 0)]))
    inputs["random_plan"] = plan
    check_forward_backward(flex_op, oracle, inputs, what=f"flex {plan_kind}")


def _tiles(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, n, n) bool: the tiles a BlockMask computes (partial or full), and those it marks full."""

    def dense(num, idx):
        n = idx.shape[-1]
        out = torch.zeros(*idx.shape[:-1], n, dtype=torch.bool)
        keep = torch.arange(n) < num[..., None].long()
        return out.scatter(-1, idx.long(), keep)

    partial = dense(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return partial | full, full


def _check_tiles(block_mask, counts: torch.Tensor, T: int, expect_full: bool = True) -> None:
    """``counts`` (B, H or 1, T, T): how often the pattern attends each pair. Pairs must lie in kept tiles; full
    tiles must hold only pairs counted once; some tiles must be skipped (else the mask proves nothing)."""
    n = block_mask.kv_indices.shape[-1]
    b = block_mask.BLOCK_SIZE[0]
    Tp = n * b
    pad = torch.nn.functional.pad

    def by_tile(x):  # (B, H, Tp, Tp) -> (B, H, n, b, n, b)
        return x.unflatten(-1, (n, b)).unflatten(-3, (n, b))

    any_pair = by_tile(pad(counts, (0, Tp - T, 0, Tp - T)) > 0).any(-1).any(-2)
    # padding queries (rows past T) are dropped by the op: for them any key is as good as attended once
    single = pad(pad(counts, (0, Tp - T)), (0, 0, 0, Tp - T), value=1) == 1
    all_single = by_tile(single).all(-1).all(-2)
    kept, full = _tiles(block_mask)
    assert not (any_pair & ~kept).any(), "an allowed pair lies in a tile the block mask skips"
    assert not (full & ~all_single).any(), "a tile marked full holds a pair that is masked or repeated"
    assert (~kept).any(), "the block mask skips no tile"
    assert full.any() or not expect_full, "no tile is marked full"


@pytest.mark.parametrize("causal", [False, True])
def test_window_block_mask_tiles(causal):
    T = 700
    pattern = SparsePattern(window=300 if causal else 130, causal=causal)  # wide enough for full tiles
    glob = torch.zeros(2, T, dtype=torch.bool)
    glob[0, [3, 400]] = True
    key_ok = torch.ones(2, T, dtype=torch.bool)
    key_ok[1, 500:] = False
    mask = flex.window_block_mask(pattern, T, glob, key_ok, None)
    allowed = naive.dense_allowed(pattern, T, glob, key_ok, None, "cpu")
    _check_tiles(mask, allowed[:, None].long(), T)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "bs, tile", [(64, None), (48, 128)]
)  # tiles of one block (the CPU's), or across blocks
def test_layout_block_mask_tiles(bs, tile, causal):
    T = 900
    pattern = bigbird(bs, window_blocks=2 if causal else 3, random_blocks=2, causal=causal, seed=1)
    nb = pattern.num_blocks(T)
    plan = pattern.random_plan(nb, 2)
    plan[1, 6, 0] = 0  # a repeat: that block counts twice
    key_ok = torch.ones(2, T, dtype=torch.bool)
    key_ok[0, 800:] = False
    mask, score_mod = flex.layout_block_mask(pattern, T, key_ok, plan, 2, "cpu", tile=tile)
    assert mask.BLOCK_SIZE[0] == (tile or bs)
    assert score_mod is not None
    index = torch.arange(T)[None]
    counts = naive.block_counts(pattern, index, index, nb, plan) * key_ok[:, None, None, :]
    # blocks of 48 across 128-token tiles, causal: no tile is attended whole
    _check_tiles(mask, counts, T, expect_full=not (bs == 48 and causal))


def _float32(inputs):
    return {
        n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
        for n, x in inputs.items()
    }


def test_compiled_forward_window_and_globals():
    """The compiled kernel (which skips tiles and trusts full ones) on Longformer's pattern, two inputs through one
    compiled graph."""
    pattern = SparsePattern(window=40)
    for seed, rows, pad in [(0, [[0, 150], [299]], ("left", 70)), (1, [[5], [0, 1]], ("right", 130))]:
        inputs = make_inputs(
            2,
            300,
            D=16,
            pattern=pattern,
            global_rows=rows,
            own_global=True,
            pad=[pad, ("right", 0)],
            seed=seed,
        )
        with torch.no_grad():
            out = sparse_attention(**_float32(inputs), backend="flex")
        assert rel_err(out, oracle(**inputs)) < TOLERANCE[torch.float32]


def test_compiled_forward_layout_with_eval_plan():
    pattern = bigbird(64, random_blocks=3)
    inputs = make_inputs(2, 517, D=16, pattern=pattern, pad=[("right", 40), ("right", 0)], seed=2)
    inputs["random_plan"] = torch.zeros(1, pattern.num_blocks(517), 3, dtype=torch.long)
    with torch.no_grad():
        out = sparse_attention(**_float32(inputs), backend="flex")
    assert rel_err(out, oracle(**inputs)) < TOLERANCE[torch.float32]


@pytest.fixture
def calls(monkeypatch):
    """Which forms run: every chunk and flex entry point recorded by name."""
    seen = []
    for module, name in [
        (chunk, "chunk_sparse_attention"),
        (chunk, "chunk_block_sparse_attention"),
        (flex, "flex_sparse_attention"),
        (flex, "flex_block_sparse_attention"),
    ]:
        fn = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _fn=fn, _name=name, **kw: seen.append(_name) or _fn(*a, **kw)
        )
    return seen


@pytest.mark.parametrize("layout", [False, True])
def test_routing_what_flex_cannot_do(layout, calls):
    pattern = bigbird(4) if layout else SparsePattern(window=3)
    form = "block_sparse_attention" if layout else "sparse_attention"
    inputs = make_inputs(1, 20, pattern=pattern)

    # gradients on the CPU: the torch form, whose gradients are the oracle's
    check_forward_backward(flex_op, oracle, inputs, what="flex routed to torch for gradients")
    assert calls == [f"chunk_{form}"]

    # dropout: the torch form (same draws as calling it directly)
    calls.clear()
    with torch.no_grad():
        torch.manual_seed(5)
        routed = sparse_attention(**inputs, dropout=0.3, backend="flex")
        torch.manual_seed(5)
        direct = sparse_attention(**inputs, dropout=0.3, backend="torch")
    assert calls == [f"chunk_{form}"] * 2
    assert torch.equal(routed, direct)

    # no gradient, no dropout: FlexAttention (also for leaves that require grad, under no_grad)
    calls.clear()
    with torch.no_grad():
        out = sparse_attention(**inputs, backend="flex")
        leaves = {n: (x.clone().requires_grad_() if n in ("q", "k", "v") else x) for n, x in inputs.items()}
        assert torch.equal(sparse_attention(**leaves, backend="flex"), out)
    assert calls == [f"flex_{form}"] * 2
    assert rel_err(out, oracle(**inputs)) < TOLERANCE[torch.float64]


def test_default_backend_per_device(monkeypatch):
    monkeypatch.delenv("ZOO_BACKEND", raising=False)
    assert sparse_backend(None, torch.device("cpu")) == "torch"
    assert sparse_backend(None, torch.device("cuda")) == "torch"
    monkeypatch.setenv("ZOO_BACKEND", "flex")
    assert sparse_backend(None, torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="'flex'"):
        resolve_backend("retention", None, torch.device("cpu"))  # flex is sparse attention's own name
