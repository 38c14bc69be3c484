"""``python -m bench.sparse_attention``: the forms of ``zoo.ops.sparse_attention`` against each other and against
dense attention, on this machine: Longformer's window with a global token (Beltagy et al. 2020,
arXiv:2004.05150) and BigBird's block layout (Zaheer et al. 2020, arXiv:2007.14062).

Forms: ``chunk`` (the ``torch`` backend), ``flex`` (FlexAttention, compiled), ``flex_eager`` (FlexAttention's
unfused reference) and ``dense`` (full attention through ``scaled_dot_product_attention``, no pattern: what the
model would cost without sparsity). Training (forward + backward) and inference (forward under ``no_grad``) are
timed in interleaved rounds, every form once per round in a rotating order; each form's time is divided by
``chunk``'s of the same round and the median of those ratios is reported (a shared, loaded machine moves absolute
times, much less their ratios). A form that cannot run a case is reported with its reason (FlexAttention has no
backward on the CPU).

    python -m bench.sparse_attention --lengths 1024 4096 16384 --rounds 5
    python -m bench.sparse_attention --device cuda --dtype bfloat16     # on a GPU (FlexAttention trains there)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from zoo.ops.sparse_attention import SparsePattern, flex, sparse_attention

PATTERNS = {
    # Longformer-base: attention_window=512 (one-sided 256), the first token global
    "longformer": SparsePattern(window=256),
    # BigBird-base: blocks of 64, a window of 3 blocks, one global block at each end, 3 random blocks
    "bigbird": SparsePattern(block_size=64, window_blocks=3, global_blocks=1, random_blocks=3),
}


def _inputs(T: int, heads: int, head_dim: int, grad: bool, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(T)
    return tuple(
        torch.randn(1, T, heads, head_dim, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)
    )


def _form(name: str, pattern: SparsePattern, T: int, device: str = "cpu"):
    """A callable (q, k, v) -> out, or a string saying why the form cannot run."""
    extra = {}
    if not pattern.is_block_layout:
        glob = torch.zeros(1, T, dtype=torch.bool, device=device)
        glob[:, 0] = True
        extra["global_mask"] = glob
    if name == "chunk":
        return lambda q, k, v: sparse_attention(q, k, v, pattern, backend="torch", **extra)
    if name in ("flex", "flex_eager"):
        compiled = name == "flex"

        def run(q, k, v):
            if q.requires_grad and not flex.supports_grad(q.device):
                raise NotImplementedError
            scale = q.shape[-1] ** -0.5
            if pattern.is_block_layout:
                plan = pattern.random_plan(pattern.num_blocks(T), q.shape[2])
                return flex.flex_block_sparse_attention(
                    q, k, v, pattern, scale, None, plan, compiled=compiled
                )
            g = extra["global_mask"]
            return flex.flex_sparse_attention(
                q, k, v, pattern, scale, g, None, None, None, None, None, compiled
            )

        return run
    if name == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
    raise ValueError(f"unknown form {name!r}")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, q, k, v, train: bool) -> float:
    _sync(q.device)
    start = time.perf_counter()
    if train:
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(q, k, v)
    _sync(q.device)
    return time.perf_counter() - start


def run(
    lengths,
    rounds=5,
    heads=4,
    head_dim=64,
    forms=("chunk", "flex", "flex_eager", "dense"),
    patterns=tuple(PATTERNS),
    modes=("train", "forward"),
    device: str = "cpu",
    dtype=torch.float32,
) -> dict:
    results = {}
    for pname in patterns:
        pattern = PATTERNS[pname]
        for train in [mode == "train" for mode in modes]:
            mode = "train" if train else "forward"
            for T in lengths:
                q, k, v = _inputs(T, heads, head_dim, train, device, dtype)
                runnable, skipped = {}, {}
                for name in forms:
                    if name == "flex_eager" and T > 4096:
                        skipped[name] = "dense T x T scores (unfused reference): skipped past 4K"
                        continue
                    fn = _form(name, pattern, T, device)
                    try:
                        _time(fn, q, k, v, train)  # warm-up (compiles flex)
                    except NotImplementedError:
                        skipped[name] = "no FlexAttention backward on this device"
                        continue
                    runnable[name] = fn
                    for x in (q, k, v):
                        x.grad = None
                times = {name: [] for name in runnable}
                for r in range(rounds):
                    names = list(runnable)
                    names = names[r % len(names) :] + names[: r % len(names)]
                    for name in names:
                        times[name].append(_time(runnable[name], q, k, v, train))
                ratios = {
                    name: statistics.median(t / c for t, c in zip(times[name], times["chunk"]))
                    for name in runnable
                }
                key = f"{pname} {mode} T={T}"
                results[key] = {"ratio_to_chunk": ratios, "chunk_median_s": statistics.median(times["chunk"])}
                results[key].update({f"{n} skipped": why for n, why in skipped.items()})
                print(key, {n: round(x, 2) for n, x in ratios.items()}, skipped or "", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sparse_attention", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    parser.add_argument("--modes", nargs="+", choices=["train", "forward"], default=["train", "forward"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    results = run(
        args.lengths, args.rounds, args.heads, args.head_dim, patterns=args.patterns, modes=args.modes,
        device=args.device, dtype=getattr(torch, args.dtype),
    )  # fmt: skip
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    results["device"] = f"{where}, {args.dtype}, torch {torch.__version__}"
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
