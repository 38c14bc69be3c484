"""``python -m bench.infini``: zoo's Infini-attention against the baseline transformer of the same width and depth
(training-step seconds over lengths, with fitted log-log exponents), and Infini-attention's decoding (ms per token
after short and long prompts, which run with the cache in pieces of one segment). Infini-attention: Munkhdalai et
al., 2024, arXiv:2404.07143.

``--memory-lengths`` measures peak memory instead: one fresh child process per (mode, length) builds the model,
runs a no-grad forward of that many tokens, and reports its peak resident memory (``VmHWM`` after the forward
minus ``VmRSS`` before it, the kernel's peak counter reset just before; the child runs with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors go back to the OS, as in :mod:`bench.memprobe`). Modes:

* ``forward``: ``model(ids, use_cache=False)``, every position's logits (T x vocab: grows with T by design);
* ``prefill``: ``model(ids, use_cache=True, logits_to_keep=1)``, the streaming prefill: pieces of one segment,
  the cache carrying the memory and the unfinished segment's keys and values, the last position's logits;
* ``generate``: ``model.generate(ids, attention_mask=ones, max_new_tokens=1)``, the prefill as ``generate()`` runs
  it.

The target (issue 18): the streaming forward's peak flat in T from 4K to 64K, the longest length's peak within
1.2x of the shortest's.

    python -m bench.infini --lengths 4096 16384 --segment-length 2048 --decode-contexts 1024 16384
    python -m bench.infini --lengths 256 512 --segment-length 64 --decode-contexts 128 512 --repeats 1   # seconds
    python -m bench.infini --memory-lengths 4096 8192 16384 32768 65536 --out-dir bench/results/infini_memory_cpu2
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.harness import MMAP_THRESHOLD, REPO_ROOT, linear_fit, machine_info, median, random_ids, train_step
from zoo.models.registry import sized_config
from zoo.models.utils import output_cache

MEMORY_MODES = ("forward", "prefill", "generate")
TARGET_MEMORY_RATIO = 1.2  # the streaming forward's peak at the longest length over that at the shortest
TARGET_MEMORY_MODE = "prefill"


def infini_config(segment_length=2048, update="delta", hidden_size=256, layers=4):
    """The bench's Infini-attention model: ``sized_config`` at this width and depth, segments of
    ``segment_length`` tokens (rotary positions never go past one segment)."""
    return sized_config(
        "zoo_infini", hidden_size, layers, segment_length=segment_length, memory_update=update,
        max_position_embeddings=segment_length,
    )  # fmt: skip


def run(
    lengths, decode_contexts, segment_length=2048, update="delta", hidden_size=256, layers=4, repeats=3
) -> dict:
    """Median training-step seconds per length for both models, their log-log exponents, the transformer's time
    over Infini-attention's per length, and Infini-attention's ms per decoded token after each context."""
    from transformers import AutoModelForCausalLM

    grid = max([*lengths, *decode_contexts]) + 1
    configs = {
        "infini": infini_config(segment_length, update, hidden_size, layers),
        "transformer": sized_config("zoo_transformer", hidden_size, layers, max_position_embeddings=grid),
    }
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


def _status_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = (line.split(":", 1) for line in f if line.startswith(("VmRSS:", "VmHWM:")))
        return {key: int(value.split()[0]) for key, value in fields}


def _forward(model, ids: torch.Tensor, mode: str) -> dict:
    """One no-grad forward of ``mode``; the bytes of what it returns (logits, and the cache for a prefill)."""
    if mode == "forward":
        logits = model(input_ids=ids, use_cache=False).logits
        return {"logits_bytes": logits.nbytes}
    if mode == "prefill":
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        tensors = [t for layer in cache.states.values() for t in layer.values()]
        return {"logits_bytes": out.logits.nbytes, "cache_bytes": sum(t.nbytes for t in tensors)}
    if mode == "generate":
        # the mask a tokenizer gives: without it generate() would take every id 0 for padding
        mask = torch.ones_like(ids)
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        return {}
    raise ValueError(f"mode must be one of {MEMORY_MODES}, got {mode!r}")


def memory_child(spec: dict) -> dict:
    """In this (fresh) process: build the model, warm up with a forward of one segment and a bit in the same mode
    (one-off allocations stay in the baseline), then the peak resident memory of one forward of ``length``
    tokens above the resident set before it."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    config = infini_config(**spec["model"])
    model = AutoModelForCausalLM.from_config(config).eval()
    mode, T = spec["mode"], spec["length"]
    with torch.no_grad():
        _forward(model, random_ids(config.vocab_size, config.segment_length + 64, spec["seed"]), mode)
        ids = random_ids(config.vocab_size, T, spec["seed"] + T)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM restarts at the current resident set
            f.write("5")
        base_kib = _status_kib()["VmRSS"]
        returned = _forward(model, ids, mode)
        peak_kib = _status_kib()["VmHWM"]
    return {"mode": mode, "seq_len": T, "peak_bytes": (peak_kib - base_kib) * 1024,
            "baseline_rss_bytes": base_kib * 1024, **returned}  # fmt: skip


def measure_memory(lengths, modes=MEMORY_MODES, threads=1, seed=0, **model) -> dict:
    """One child process (``python -m bench.infini --probe SPEC``) per (mode, length); per mode the peaks, their
    least-squares bytes per token, and the longest length's peak over the shortest's."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    runs = {mode: {} for mode in modes}
    for mode in modes:
        for T in lengths:
            spec = {"mode": mode, "length": T, "threads": threads, "seed": seed, "model": model}
            proc = subprocess.run(
                [sys.executable, "-m", "bench.infini", "--probe", json.dumps(spec)],
                env=env, cwd=REPO_ROOT, capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe {mode} T={T} failed:\n{proc.stderr[-4000:]}")
            runs[mode][T] = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = {}
    lo, hi = min(lengths), max(lengths)
    for mode, by_len in runs.items():
        peaks = [by_len[T]["peak_bytes"] for T in lengths]
        fit = linear_fit(lengths, peaks) if len(lengths) > 1 else {}
        summary[mode] = {
            "peak_bytes": {T: by_len[T]["peak_bytes"] for T in lengths},
            "bytes_per_token": fit.get("slope"),
            "ratio_longest_over_shortest": by_len[hi]["peak_bytes"] / max(by_len[lo]["peak_bytes"], 1),
        }
    target = summary.get(TARGET_MEMORY_MODE)
    return {
        "model": infini_config(**model).to_diff_dict(),
        "threads": threads,
        "lengths": list(lengths),
        "runs": {mode: list(by_len.values()) for mode, by_len in runs.items()},
        "summary": summary,
        "target": {
            "mode": TARGET_MEMORY_MODE,
            "lengths": [lo, hi],
            "max_ratio": TARGET_MEMORY_RATIO,
            "ratio": None if target is None else target["ratio_longest_over_shortest"],
            "met": None if target is None else target["ratio_longest_over_shortest"] <= TARGET_MEMORY_RATIO,
        },
    }


def memory_table(result: dict) -> str:
    """Markdown: peak MiB per mode and length, and each mode's longest/shortest ratio."""
    lengths = result["lengths"]
    lines = [
        "| mode | " + " | ".join(f"T={T}" for T in lengths) + " | longest/shortest | bytes/token |",
        "|---" * (len(lengths) + 3) + "|",
    ]
    for mode, s in result["summary"].items():
        peaks = " | ".join(f"{s['peak_bytes'][T] / 2**20:.1f}" for T in lengths)
        slope = s["bytes_per_token"]
        lines.append(
            f"| {mode} | {peaks} | {s['ratio_longest_over_shortest']:.2f}x | "
            + ("-" if slope is None else f"{slope:.0f}")
            + " |"
        )
    t = result["target"]
    if t["ratio"] is not None:
        verdict = "met" if t["met"] else "NOT met"
        lines.append(
            f"\nPeak MiB above the resident set before the forward. Target: `{t['mode']}` at T={t['lengths'][1]} "
            f"within {t['max_ratio']}x of T={t['lengths'][0]}: {t['ratio']:.2f}x, {verdict}."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.infini",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--segment-length", type=int, default=2048)
    parser.add_argument("--memory-update", choices=["linear", "delta"], default="delta")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--memory-lengths",
        type=int,
        nargs="+",
        help="measure peak forward memory at these lengths (no timing)",
    )
    parser.add_argument("--memory-modes", nargs="+", choices=MEMORY_MODES, default=list(MEMORY_MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the memory probes")
    parser.add_argument("--out-dir", type=Path, help="write result.json and table.md of the memory run here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # a child of the memory measurement
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_child(json.loads(args.probe))), flush=True)
        return 0
    model = {
        "segment_length": args.segment_length, "update": args.memory_update, "hidden_size": args.hidden_size,
        "layers": args.layers,
    }  # fmt: skip
    if args.memory_lengths:
        machine = machine_info()
        result = measure_memory(args.memory_lengths, args.memory_modes, args.threads, **model)
        machine["loadavg_end"] = list(os.getloadavg())
        result = {"command": "python -m bench.infini " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": machine, **result}  # fmt: skip
        table = memory_table(result)
        print(table)
        if args.out_dir:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            (args.out_dir / "table.md").write_text(f"`{result['command']}`\n\n{table}")
        return 0
    result = run(args.lengths, args.decode_contexts, repeats=args.repeats, **model)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
