"""``python -m bench.infini``: zoo's Infini-attention against the baseline transformer of the same width and depth
(training-step seconds over lengths, with fitted log-log exponents), and Infini-attention's decoding (ms per token
after short and long prompts, which run with the cache in pieces of one segment). Infini-attention: Munkhdalai et
al., 2024, arXiv:2404.07143.

    python -m bench.infini --lengths 4096 16384 --segment-length 2048 --decode-contexts 1024 16384
    python -m bench.infini --lengths 256 512 --segment-length 64 --decode-contexts 128 512 --repeats 1   # seconds
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.harness import linear_fit, median, random_ids, train_step
from zoo.models.registry import sized_config
from zoo.models.utils import output_cache


def run(
    lengths, decode_contexts, segment_length=2048, update="delta", hidden_size=256, layers=4, repeats=3
) -> dict:
    """Median training-step seconds per length for both models, their log-log exponents, the transformer's time
    over Infini-attention's per length, and Infini-attention's ms per decoded token after each context."""
    from transformers import AutoModelForCausalLM

    grid = max([*lengths, *decode_contexts]) + 1
    configs = {
        "infini": sized_config(
            "zoo_infini", hidden_size, layers, segment_length=segment_length, memory_update=update,
            max_position_embeddings=segment_length,
        ),
        "transformer": sized_config("zoo_transformer", hidden_size, layers, max_position_embeddings=grid),
    }  # fmt: skip
    models = {name: AutoModelForCausalLM.from_config(cfg) for name, cfg in configs.items()}
    steps = {name: {} for name in models}
    for T in lengths:
        ids = random_ids(259, T, seed=T)
        for name, model in models.items():
            times = []
            for _ in range(repeats + 1):  # the first is warm-up
                start = time.perf_counter()
                train_step(model, ids)
                times.append(time.perf_counter() - start)
            steps[name][T] = median(times[1:])
    infini = models["infini"].eval()
    decode = {}
    with torch.no_grad():
        for T in decode_contexts:
            cache = output_cache(infini(random_ids(259, T, seed=1), use_cache=True))
            nxt = random_ids(259, 1, seed=2)
            start = time.perf_counter()
            for _ in range(8):
                cache = output_cache(infini(nxt, cache=cache, use_cache=True))
            decode[T] = (time.perf_counter() - start) / 8 * 1e3
    exponents = {
        name: linear_fit([math.log(T) for T in lengths], [math.log(steps[name][T]) for T in lengths])
        for name in steps
    } if len(lengths) > 1 else {}  # fmt: skip
    speedup = {T: steps["transformer"][T] / steps["infini"][T] for T in lengths}
    return {
        "train_seconds": steps,
        "exponents": exponents,
        "transformer_over_infini": speedup,
        "decode_ms": decode,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.infini", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--segment-length", type=int, default=2048)
    parser.add_argument("--memory-update", choices=["linear", "delta"], default="delta")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(
        args.lengths, args.decode_contexts, args.segment_length, args.memory_update, repeats=args.repeats
    )
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
