"""Where one cached decoding step of a bench entry's model spends its time: ``torch.profiler`` over a few steps after
a prefill, the top operators by device time (CUDA) or CPU time, and the step's wall time.

    python scripts/decode_profile.py --entries transformer rmt retnet --context 1024 [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.registry import load_entries  # noqa: E402
from zoo.models.utils import CACHE_NAME, output_cache  # noqa: E402


def profile_entry(entry, hidden: int, layers: int, context: int, steps: int, device: str, rows: int) -> str:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = entry.make(hidden, layers, context + steps + 8).to(device, dtype).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal cache, token
            out = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)

        for _ in range(3):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        ms = 1e3 * (time.perf_counter() - start) / steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    return f"== {entry.name}: {ms:.2f} ms per token after {context} tokens ({device}, {dtype})\n{table}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", nargs="+", default=["transformer"])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    entries = load_entries()
    for name in args.entries:
        print(profile_entry(entries[name], args.hidden_size, args.layers, args.context, args.steps, args.device,
                            args.rows), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
