"""``python -m bench.hyena``: zoo's Hyena against the baseline transformer of the same width and depth (training
step tokens/s over lengths, with the fitted scaling exponent), and decoding with distilled recurrences (ms per
token after short and long contexts). Hyena: Poli et al., 2023, arXiv:2302.10866; distillation: Massaroli et al.,
2023, arXiv:2310.18780.

    python -m bench.hyena --lengths 1024 4096 16384 --decode-contexts 1024 16384
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.harness import linear_fit, median, random_ids, train_step
from zoo.models.registry import sized_config
from zoo.models.utils import output_cache


def run(lengths, decode_contexts, hidden_size=256, layers=4, repeats=3, state_dim=16) -> dict:
    """Median training-step seconds per length for both models, Hyena's log-log exponent, and ms per distilled
    decoding token after each context."""
    from transformers import AutoModelForCausalLM

    grid = max([*lengths, *decode_contexts]) + 1
    models = {
        "hyena": sized_config("zoo_hyena", hidden_size, layers, max_position_embeddings=grid),
        "transformer": sized_config("zoo_transformer", hidden_size, layers, max_position_embeddings=grid),
    }
    models = {name: AutoModelForCausalLM.from_config(cfg) for name, cfg in models.items()}
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
    hyena = models["hyena"].eval()
    errors = hyena.distill_recurrence(state_dim, length=min(grid, 4096))
    decode = {}
    with torch.no_grad():
        for T in decode_contexts:
            cache = output_cache(hyena(random_ids(259, T, seed=1), use_cache=True))
            nxt = random_ids(259, 1, seed=2)
            start = time.perf_counter()
            for _ in range(8):
                cache = output_cache(hyena(nxt, cache=cache, use_cache=True))
            decode[T] = (time.perf_counter() - start) / 8 * 1e3
    fit = linear_fit([math.log(T) for T in lengths], [math.log(steps["hyena"][T]) for T in lengths])
    return {"train_seconds": steps, "hyena_exponent": fit, "distill_errors": errors, "decode_ms": decode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hyena", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(run(args.lengths, args.decode_contexts, repeats=args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
