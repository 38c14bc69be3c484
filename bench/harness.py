"""The benchmark harness: RetNet against the baseline transformer of the same width and depth, on one machine.

Three measurements, each reported per sequence length:

* **training throughput** -- tokens/s of one training step (forward + backward of the causal-LM loss, batch 1,
  gradients zeroed with ``set_to_none``; no optimiser update). Both models live in one process and are timed
  *interleaved*: after ``warmup`` untimed steps each, repeat ``r`` times RetNet then the transformer, the next
  repeat in the opposite order (A B, B A, ...). The ratio is taken per repeat from the two steps measured next to
  each other, then the median over repeats: a machine that slows down or speeds up (other jobs on the CPU) moves
  both halves of a pair together. With ``packed_documents`` the same tokens are also timed as that many packed
  documents (``position_ids`` restarting at 0, as packed training batches come), inside the same repeats (R T Rp
  Tp, then Tp Rp T R, ...), so that packed/unpacked is a per-repeat ratio as well.
* **peak memory of a training step** -- measured in a fresh child process (see :mod:`bench.memprobe`): build the
  model, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``), run one step, read ``VmHWM`` and
  subtract the resident set before the step. The child runs with a fixed glibc mmap threshold so that freed
  tensors go back to the OS and resident memory follows live memory. The bytes saved for backward are counted
  too (a ``saved_tensors_hooks`` tally of distinct storages, parameters excluded): deterministic, noise-free
  activation memory.
* **decoding** -- per-token latency of single-token steps with the cache after a prefill of ``1K`` and ``16K``
  tokens; every (model, context) pair runs one block of steps per repeat, in alternating order, and the 16K/1K
  ratio is again the median of per-repeat ratios.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zoo.models.utils import CACHE_NAME, output_cache
from zoo.training.allocator import allocator_settings

SCHEMA_VERSION = 1
MODELS = ("retnet", "transformer")
REPO_ROOT = Path(__file__).resolve().parent.parent

# Targets for RetNet against the transformer, measured on this CPU at equal width/depth.
TARGET_TRAIN_SPEEDUP = 3.0
TARGET_TRAIN_SPEEDUP_AT = 8192
TARGET_DECODE_RATIO = 1.2
# "Linear in T": the last doubling of T multiplies the peak by at most 2^1.15, and a line fits all points.
LINEAR_MAX_EXPONENT = 1.15
LINEAR_MIN_R2 = 0.99

MEMORY_METHOD = (
    "peak RSS of a training step in a fresh child process: VmHWM after the step minus VmRSS before it, the peak "
    "counter reset with /proc/self/clear_refs just before the step; the child runs with "
    "MALLOC_MMAP_THRESHOLD_={threshold} so freed tensors are returned to the OS; isolation '{isolation}' "
    "({isolation_doc}). saved_for_backward_bytes: distinct storages saved by autograd (saved_tensors_hooks), "
    "parameters excluded."
)
RETNET_FFN = {
    "matched": "RetNet's feed-forward narrowed to the transformer's parameter count (the RetNet paper's allocation)",
    "equal": "RetNet's feed-forward as wide as the transformer's (RetNet has more parameters)",
}
ISOLATION_DOC = {
    "per-run": "one fresh process per (model, length)",
    "per-model": "one fresh process per model, lengths ascending, peak reset between them",
    "shared": "one fresh process for every (model, length), peak reset between them",
}


@dataclass
class BenchConfig:
    """Everything a run depends on; stored in the JSON."""

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    intermediate_size: int | None = None  # None: 2 * hidden_size (the transformer's feed-forward width)
    # RetNet's feed-forward width: "matched" narrows it so that both models have the same parameter count (the
    # RetNet paper's allocation, the default); "equal" gives it the transformer's width (RetNet then has
    # ~40% more parameters)
    retnet_ffn: str = "matched"
    vocab_size: int = 259
    chunk_size: int = 64
    repeats: int = 3
    warmup: int = 1
    # the packed-batch workload: each length also trained as this many packed documents of near-equal length
    # (position_ids restarting at 0; at most one per token); 0: off
    packed_documents: int = 32
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 16384])
    decode_steps: int = 32
    decode_warmup: int = 4
    memory: str = "per-run"  # per-run | per-model | shared | off
    threads: int | None = None
    seed: int = 0
    skip_train: bool = False
    skip_decode: bool = False
    # torch.compile both models for the training steps (inductor; compiled during the warm-up steps); peak
    # memory and decoding are measured eager
    compile: bool = False
    # where both models run: "cpu", or "cuda" (GPU timings synchronise the device around each timed region;
    # peak memory is then torch.cuda's peak allocation of a step, in this process)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        if self.threads is None:
            self.threads = torch.get_num_threads()
        if self.retnet_ffn not in RETNET_FFN:
            raise ValueError(f"retnet_ffn must be one of {list(RETNET_FFN)}, got {self.retnet_ffn!r}")
        if self.memory not in (*ISOLATION_DOC, "off"):
            raise ValueError(f"memory must be one of {[*ISOLATION_DOC, 'off']}, got {self.memory!r}")
        for name in ("lengths", "decode_contexts"):
            values = getattr(self, name)
            if any(v < 2 for v in values):
                raise ValueError(f"{name} must be >= 2, got {values}")
            setattr(self, name, sorted(set(values)))
        if self.packed_documents == 1 or self.packed_documents < 0:
            raise ValueError(f"packed_documents must be 0 (off) or >= 2, got {self.packed_documents}")
        if self.repeats < 1 or self.warmup < 0 or self.decode_steps < 1:
            raise ValueError("repeats and decode_steps must be >= 1, warmup >= 0")
        if self.compile and self.warmup < 1:
            raise ValueError("compile needs warmup >= 1: the first step of each length compiles")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")


# --------------------------------------------------------------------------------------------------- models


def model_kwargs(cfg: BenchConfig) -> dict:
    """Shared width/depth of both models; positions cover the longest sequence measured."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": max([*cfg.lengths, *cfg.decode_contexts]) + 4096,
    }


def build_model(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """``retnet`` (chunk mode, the torch chunked backend on CPU) or ``transformer`` (SDPA attention)."""
    import zoo  # noqa: F401  (registers the architectures)
    from zoo.models.retnet import RetNetConfig, RetNetForCausalLM
    from zoo.models.transformer import TransformerConfig, TransformerForCausalLM

    torch.manual_seed(seed)
    if name == "retnet":
        return RetNetForCausalLM(RetNetConfig(**kwargs, retention_mode="chunk"))
    if name == "transformer":
        return TransformerForCausalLM(TransformerConfig(**kwargs))
    raise ValueError(f"unknown model {name!r}, expected one of {MODELS}")


def matched_retnet_intermediate(cfg: BenchConfig) -> int:
    """RetNet's feed-forward width that gives it the transformer's parameter count.

    Per layer, retention has 2 C^2 (q, k) + 3 C V (v, gate, out; V = 2 C) = 8 C^2 parameters against 4 C^2 for
    attention; the SwiGLU feed-forward has 3 C I. The difference comes off RetNet's I, as the RetNet paper
    does (its FFN is narrower than the transformer's at equal size).
    """
    C = cfg.hidden_size
    extra = 3 * C * (2 * C) - 2 * C * C  # retention minus attention, per layer
    width = round(cfg.intermediate_size - extra / (3 * C))
    if width < 1:
        raise ValueError(
            f"retnet_ffn='matched': intermediate_size {cfg.intermediate_size} is too small to match"
        )
    return width


def model_settings(cfg: BenchConfig, name: str) -> dict:
    kwargs = dict(model_kwargs(cfg))
    if name == "retnet":
        kwargs["chunk_size"] = cfg.chunk_size
        if cfg.retnet_ffn == "matched":
            kwargs["intermediate_size"] = matched_retnet_intermediate(cfg)
    return kwargs


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_ids(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=gen)


def packed_position_ids(length: int, documents: int) -> torch.Tensor:
    """(1, length) positions of ``documents`` packed documents of near-equal lengths, each restarting at 0 (as
    ``zoo.data.packing`` writes them); the models find the document boundaries from them."""
    bounds = [i * length // documents for i in range(documents + 1)]
    return torch.cat([torch.arange(hi - lo) for lo, hi in zip(bounds, bounds[1:])])[None]


def train_step(model: torch.nn.Module, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
    """Forward + backward of the causal-LM loss; gradients released afterwards."""
    out = model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
        # glibc malloc tuning and preloaded allocators change how often freed memory is returned to the OS and
        # faulted back in (see minor_faults in the training results)
        "allocator_env": {
            k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"
        },
        # mallopt settings applied in this process (zoo.training.allocator.keep_freed_memory), None: defaults
        "allocator_mallopt": allocator_settings(),
    }


# --------------------------------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least-squares ``y = intercept + slope * x``, its R^2, and the log-log growth exponent of each doubling."""
    n = len(xs)
    if n < 2:
        return {"slope": None, "intercept": None, "r2": None, "growth_exponents": []}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    exps = []
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        exps.append(math.log(y1 / y0) / math.log(x1 / x0) if y0 > 0 and y1 > 0 else None)
    return {"slope": slope, "intercept": intercept, "r2": r2, "growth_exponents": exps}


def is_linear(fit: dict) -> bool | None:
    exps = [e for e in fit.get("growth_exponents") or [] if e is not None]
    if not exps or fit.get("r2") is None:
        return None
    return exps[-1] <= LINEAR_MAX_EXPONENT and fit["r2"] >= LINEAR_MIN_R2


# --------------------------------------------------------------------------------------------------- training


def _sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it (nothing to do on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _pair_order(r: int, names: Sequence[str]) -> list[str]:
    """A B, B A, A B, ...: each model is first in half of the pairs."""
    return list(names) if r % 2 == 0 else list(reversed(names))


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on every platform
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@contextmanager
def _gc_paused():
    """No cyclic-garbage collection pauses inside timed regions (reference counting still frees tensors)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _step_stats(length: int, times: list[float], faults: list[int]) -> dict:
    step = median(times)
    return {
        "step_s": times,
        "step_s_median": step,
        "tokens_per_s_median": length / step,
        # pages the kernel had to map in during the step: memory the allocator had returned to the OS
        "minor_faults": faults,
    }


def _speedup(row: dict, times: dict[str, list[float]]) -> None:
    if "retnet" in times and "transformer" in times:
        # transformer time / RetNet time = RetNet's tokens/s over the transformer's, per adjacent pair
        paired = [t / r for t, r in zip(times["transformer"], times["retnet"])]
        row["speedup_paired"] = paired
        row["speedup_median"] = median(paired)


def time_training(
    models: dict[str, torch.nn.Module], cfg: BenchConfig, bar: tqdm | None = None
) -> list[dict]:
    names = list(models)
    results = []
    for length in cfg.lengths:
        ids = random_ids(cfg.vocab_size, length, cfg.seed + length).to(cfg.device)
        # the workloads: one sequence (no position_ids), and the same tokens as packed documents
        documents = min(cfg.packed_documents, length)
        workloads = {"unpacked": None}
        if documents:
            workloads["packed"] = packed_position_ids(length, documents).to(cfg.device)
        runs = [(name, workload) for workload in workloads for name in names]
        label = lambda name, workload: name + (" packed" if workload == "packed" else "")
        for model in models.values():
            model.train()
        for _ in range(cfg.warmup):
            for name, workload in runs:
                _describe(bar, f"train T={length} warmup {label(name, workload)}")
                train_step(models[name], ids, workloads[workload])
                _tick(bar)
        times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
        faults: dict[tuple[str, str], list[int]] = {run: [] for run in runs}
        gc.collect()
        with _gc_paused():
            for r in range(cfg.repeats):
                for name, workload in _pair_order(r, runs):
                    _describe(bar, f"train T={length} {label(name, workload)} {r + 1}/{cfg.repeats}")
                    faults_before = _minor_faults()
                    _sync(cfg.device)
                    start = time.perf_counter()
                    train_step(models[name], ids, workloads[workload])
                    _sync(cfg.device)
                    times[name, workload].append(time.perf_counter() - start)
                    faults[name, workload].append(_minor_faults() - faults_before)
                    _tick(bar)
        row: dict = {"seq_len": length}
        unpacked = {name: times[name, "unpacked"] for name in names}
        for name in names:
            row[name] = _step_stats(length, unpacked[name], faults[name, "unpacked"])
        _speedup(row, unpacked)
        if "packed" in workloads:
            packed_times = {name: times[name, "packed"] for name in names}
            packed: dict = {"documents": documents}
            for name in names:
                packed[name] = _step_stats(length, packed_times[name], faults[name, "packed"])
            _speedup(packed, packed_times)
            # packed step time / unpacked step time of the same model, per repeat
            ratios = {name: [p / u for p, u in zip(packed_times[name], unpacked[name])] for name in names}
            packed["packed_over_unpacked_paired"] = ratios
            packed["packed_over_unpacked_median"] = {name: median(r) for name, r in ratios.items()}
            row["packed"] = packed
        results.append(row)
        del ids
        gc.collect()
    return results


# --------------------------------------------------------------------------------------------------- memory


MMAP_THRESHOLD = 65536


def _probe_groups(cfg: BenchConfig) -> list[list[tuple[str, int]]]:
    runs = [(name, length) for name in MODELS for length in cfg.lengths]
    if cfg.memory == "per-run":
        return [[run] for run in runs]
    if cfg.memory == "per-model":
        return [[run for run in runs if run[0] == name] for name in MODELS]
    return [runs]


def measure_cuda_memory(
    models: dict[str, torch.nn.Module], cfg: BenchConfig, bar: tqdm | None = None
) -> dict[tuple[str, int], dict]:
    """On the GPU: torch.cuda's peak allocation during one training step above what was allocated before it
    (the allocator's own statistics, exact, in this process), and the bytes saved for backward."""
    from bench.memprobe import saved_for_backward_bytes

    out: dict[tuple[str, int], dict] = {}
    for name, model in models.items():
        model.train()
        for length in cfg.lengths:
            _describe(bar, f"memory {name} T={length}")
            ids = random_ids(cfg.vocab_size, length, cfg.seed + length).to(cfg.device)
            model.zero_grad(set_to_none=True)
            gc.collect()
            _sync(cfg.device)
            base = torch.cuda.memory_allocated(cfg.device)
            torch.cuda.reset_peak_memory_stats(cfg.device)
            train_step(model, ids)
            _sync(cfg.device)
            out[(name, length)] = {
                "peak_bytes": torch.cuda.max_memory_allocated(cfg.device) - base,
                "baseline_allocated_bytes": base,
                "method": "torch.cuda.max_memory_allocated - memory_allocated before the step",
                "saved_for_backward_bytes": saved_for_backward_bytes(model, ids),
            }
            _tick(bar)
    return out


def measure_memory(cfg: BenchConfig, bar: tqdm | None = None) -> dict[tuple[str, int], dict]:
    """Run :mod:`bench.memprobe` children; returns {(model, length): measurement}."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    out: dict[tuple[str, int], dict] = {}
    for group in _probe_groups(cfg):
        spec = {
            "threads": cfg.threads,
            "seed": cfg.seed,
            "vocab_size": cfg.vocab_size,
            "models": {name: model_settings(cfg, name) for name in MODELS},
            "runs": [[name, length] for name, length in group],
        }
        _describe(
            bar,
            "memory " + ", ".join(f"{n} T={t}" for n, t in group[:2]) + (" ..." if len(group) > 2 else ""),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memprobe", json.dumps(spec)],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        for record in (json.loads(line) for line in lines):
            out[(record["model"], record["seq_len"])] = record
        _tick(bar, len(group))
    return out


# --------------------------------------------------------------------------------------------------- decoding


@torch.inference_mode()
def _prefill(model: torch.nn.Module, ids: torch.Tensor):
    out = model(input_ids=ids, use_cache=True)
    return output_cache(out), out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def _decode_block(model: torch.nn.Module, state: dict, steps: int) -> list[float]:
    """``steps`` single-token forwards with the cache; greedy next token; seconds per step."""
    cache, token = state["cache"], state["token"]
    times = []
    for _ in range(steps):
        _sync(token.device)
        start = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
        token = out.logits[:, -1:].argmax(-1)
        _sync(token.device)
        times.append(time.perf_counter() - start)
        cache = output_cache(out)
    state["cache"], state["token"] = cache, token
    state["context"] += steps
    return times


def time_decoding(models: dict[str, torch.nn.Module], cfg: BenchConfig, bar: tqdm | None = None) -> dict:
    states: dict[tuple[str, int], dict] = {}
    prefill_s: dict[tuple[str, int], float] = {}
    for name, model in models.items():
        model.eval()
        for ctx in cfg.decode_contexts:
            _describe(bar, f"decode prefill {name} {ctx}")
            ids = random_ids(cfg.vocab_size, ctx, cfg.seed + 7 * ctx).to(cfg.device)
            _sync(cfg.device)
            start = time.perf_counter()
            cache, token = _prefill(model, ids)
            _sync(cfg.device)
            prefill_s[(name, ctx)] = time.perf_counter() - start
            states[(name, ctx)] = {"cache": cache, "token": token, "context": ctx}
            _decode_block(model, states[(name, ctx)], cfg.decode_warmup)
            _tick(bar)
    keys = list(states)
    per_token: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    gc.collect()
    with _gc_paused():
        for r in range(cfg.repeats):
            for name, ctx in _pair_order(r, keys):
                _describe(bar, f"decode {name} ctx={ctx} {r + 1}/{cfg.repeats}")
                times = _decode_block(models[name], states[(name, ctx)], cfg.decode_steps)
                per_token[(name, ctx)].append(median(times))
                _tick(bar)
    lo, hi = cfg.decode_contexts[0], cfg.decode_contexts[-1]
    result: dict = {"contexts": cfg.decode_contexts, "steps_per_block": cfg.decode_steps, "models": {}}
    for name in models:
        entry: dict = {"per_context": []}
        for ctx in cfg.decode_contexts:
            blocks = per_token[(name, ctx)]
            entry["per_context"].append(
                {
                    "context": ctx,
                    "prefill_s": prefill_s[(name, ctx)],
                    "ms_per_token_blocks": [1e3 * t for t in blocks],
                    "ms_per_token_median": 1e3 * median(blocks),
                    "final_context": states[(name, ctx)]["context"],
                }
            )
        paired = [h / low for h, low in zip(per_token[(name, hi)], per_token[(name, lo)])]
        entry[f"ratio_{hi}_over_{lo}_paired"] = paired
        entry["ratio_long_over_short_median"] = median(paired)
        result["models"][name] = entry
    states.clear()
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------------- run


def _describe(bar: tqdm | None, text: str) -> None:
    if bar is not None:
        bar.set_description_str(text, refresh=True)


def _tick(bar: tqdm | None, n: int = 1) -> None:
    if bar is not None:
        bar.update(n)


def _total_steps(cfg: BenchConfig) -> int:
    total = 0
    if not cfg.skip_train:
        workloads = 2 if cfg.packed_documents else 1
        total += len(cfg.lengths) * len(MODELS) * workloads * (cfg.warmup + cfg.repeats)
        if cfg.memory != "off":
            total += len(cfg.lengths) * len(MODELS)
    if not cfg.skip_decode:
        total += len(cfg.decode_contexts) * len(MODELS) * (1 + cfg.repeats)
    return total


def evaluate_targets(result: dict) -> dict:
    targets: dict = {}
    train = result.get("training")
    if train:
        row = next((r for r in train["results"] if r["seq_len"] == TARGET_TRAIN_SPEEDUP_AT), None)
        speedup = row["speedup_median"] if row else None
        targets["train_speedup"] = {
            "target": f">= {TARGET_TRAIN_SPEEDUP}x transformer tokens/s at T={TARGET_TRAIN_SPEEDUP_AT}"
            + (f" ({result['comparison']})" if result.get("comparison") else ""),
            "measured": speedup,
            "met": None if speedup is None else speedup >= TARGET_TRAIN_SPEEDUP,
        }
        fit = (train.get("memory_fit") or {}).get("retnet")
        targets["retnet_memory_linear"] = {
            "target": (
                f"RetNet peak memory linear in T (last doubling exponent <= {LINEAR_MAX_EXPONENT}, "
                f"linear-fit R^2 >= {LINEAR_MIN_R2})"
            ),
            "measured": None
            if fit is None
            else {"r2": fit["r2"], "growth_exponents": fit["growth_exponents"]},
            "met": None if fit is None else is_linear(fit),
        }
    decode = result.get("decoding")
    if decode and "retnet" in decode["models"]:
        ratio = decode["models"]["retnet"]["ratio_long_over_short_median"]
        lo, hi = decode["contexts"][0], decode["contexts"][-1]
        targets["decode_ratio"] = {
            "target": f"RetNet per-token decode time at {hi} within {TARGET_DECODE_RATIO}x of that at {lo}",
            "measured": ratio,
            "met": ratio <= TARGET_DECODE_RATIO,
        }
    return targets


def run_benchmark(cfg: BenchConfig, argv: Iterable[str] | None = None) -> dict:
    torch.set_num_threads(cfg.threads)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or []))
    result: dict = {
        "schema_version": SCHEMA_VERSION,
        "command": command.strip(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": asdict(cfg),
        "comparison": "same width, depth and heads; " + RETNET_FFN[cfg.retnet_ffn],
        "models": {},
    }
    started = time.perf_counter()
    models = {name: build_model(name, model_settings(cfg, name), cfg.seed).to(cfg.device) for name in MODELS}
    if cfg.device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name(cfg.device)
    for name, model in models.items():
        result["models"][name] = {"params": num_params(model), "config": model_settings(cfg, name)}
    with tqdm(total=_total_steps(cfg), disable=not cfg.progress, file=sys.stderr, leave=False) as bar:
        if not cfg.skip_train:
            timed = {name: torch.compile(m) for name, m in models.items()} if cfg.compile else models
            rows = time_training(timed, cfg, bar)
            memory_fit = None
            if cfg.memory != "off":
                mem = (
                    measure_cuda_memory(models, cfg, bar)
                    if cfg.device == "cuda"
                    else measure_memory(cfg, bar)
                )
                memory_fit = {}
                for name in MODELS:
                    xs = [row["seq_len"] for row in rows]
                    for row in rows:
                        row[name].update(
                            {k: v for k, v in mem[(name, row["seq_len"])].items() if k.endswith("bytes")}
                        )
                        row[name]["peak_bytes_per_token"] = row[name]["peak_bytes"] / row["seq_len"]
                    peak_fit = linear_fit(xs, [row[name]["peak_bytes"] for row in rows])
                    saved_fit = linear_fit(xs, [row[name]["saved_for_backward_bytes"] for row in rows])
                    memory_fit[name] = {
                        **peak_fit,
                        "linear": is_linear(peak_fit),
                        "saved_for_backward": saved_fit,
                    }
            result["training"] = {
                "what": "one training step: forward + backward of the causal-LM loss, batch 1, no optimiser",
                "memory_method": None
                if cfg.memory == "off"
                else "torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
                if cfg.device == "cuda"
                else MEMORY_METHOD.format(
                    threshold=MMAP_THRESHOLD, isolation=cfg.memory, isolation_doc=ISOLATION_DOC[cfg.memory]
                ),
                "results": rows,
                "memory_fit": memory_fit,
            }
        if not cfg.skip_decode:
            result["decoding"] = time_decoding(models, cfg, bar)
    result["targets"] = evaluate_targets(result)
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_time_s"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------------- report


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_report(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    out = [
        f"zoo bench: RetNet vs transformer, hidden {cfg['hidden_size']}, {cfg['layers']} layers, "
        f"{cfg['heads']} heads, intermediate {cfg['intermediate_size']}"
        + (
            f" (RetNet {result['models']['retnet']['config']['intermediate_size']}: parameters matched)"
            if cfg.get("retnet_ffn") == "matched"
            else " (both)"
        )
        + f", vocab {cfg['vocab_size']}, RetNet chunk {cfg['chunk_size']}",
        f"params: RetNet {result['models']['retnet']['params']:,}, "
        f"transformer {result['models']['transformer']['params']:,}",
        f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} threads, "
        f"load {m['loadavg_start'][0] if m['loadavg_start'] else '-'}",
        f"command: {result['command']}",
    ]
    train = result.get("training")
    if train:
        compiled = ", both models torch.compile'd" if cfg.get("compile") else ""
        out += [
            "",
            f"Training step (fwd+bwd, batch 1{compiled}), median of {cfg['repeats']} interleaved repeats:",
        ]
        rows = []
        for r in train["results"]:
            rn, tf = r["retnet"], r["transformer"]
            rows.append(
                [
                    str(r["seq_len"]),
                    f"{rn['tokens_per_s_median']:.0f}",
                    f"{tf['tokens_per_s_median']:.0f}",
                    f"{r['speedup_median']:.2f}x",
                    _mib(rn.get("peak_bytes")),
                    _mib(tf.get("peak_bytes")),
                    _fmt(rn.get("peak_bytes_per_token") and rn["peak_bytes_per_token"] / 1024, ".1f"),
                    _mib(rn.get("saved_for_backward_bytes")),
                    _mib(tf.get("saved_for_backward_bytes")),
                ]
            )
        header = ["T", "RetNet tok/s", "TF tok/s", "RetNet/TF", "RetNet peak MiB", "TF peak MiB",
                  "RetNet KiB/tok", "RetNet saved MiB", "TF saved MiB"]  # fmt: skip
        out += _table(header, rows)
        packed_rows = [r for r in train["results"] if "packed" in r]
        if packed_rows:
            out += [
                "",
                "Packed documents (the same tokens, position_ids restarting at 0), step time over the unpacked "
                "step's, median of per-repeat ratios:",
            ]
            rows = []
            for r in packed_rows:
                p = r["packed"]
                rows.append(
                    [
                        str(r["seq_len"]),
                        str(p["documents"]),
                        f"{p['retnet']['tokens_per_s_median']:.0f}",
                        f"{p['transformer']['tokens_per_s_median']:.0f}",
                        f"{p['packed_over_unpacked_median']['retnet']:.2f}x",
                        f"{p['packed_over_unpacked_median']['transformer']:.2f}x",
                        f"{p['speedup_median']:.2f}x",
                    ]
                )
            header = ["T", "documents", "RetNet tok/s", "TF tok/s", "RetNet packed/unpacked",
                      "TF packed/unpacked", "RetNet/TF packed"]  # fmt: skip
            out += _table(header, rows)
        fits = train.get("memory_fit")
        if fits:
            for name, fit in fits.items():
                exps = ", ".join(_fmt(e, ".2f") for e in fit["growth_exponents"])
                saved = fit["saved_for_backward"]
                out.append(
                    f"{name} peak memory fit: {_fmt(fit['slope'] and fit['slope'] / 1024, '.1f')} KiB/token + "
                    f"{_mib(fit['intercept'])} MiB, R^2 {_fmt(fit['r2'], '.4f')}, growth exponent per doubling "
                    f"[{exps}]; saved-for-backward {_fmt(saved['slope'] and saved['slope'] / 1024, '.1f')} "
                    f"KiB/token (R^2 {_fmt(saved['r2'], '.4f')})"
                )
            out.append(f"memory method: {train['memory_method']}")
    dec = result.get("decoding")
    if dec:
        lo, hi = dec["contexts"][0], dec["contexts"][-1]
        out += [
            "",
            f"Decoding, ms per token (median of {cfg['repeats']} interleaved blocks of {dec['steps_per_block']}):",
        ]
        rows = []
        for name, entry in dec["models"].items():
            cells = [name] + [f"{c['ms_per_token_median']:.2f}" for c in entry["per_context"]]
            cells.append(f"{entry['ratio_long_over_short_median']:.2f}x")
            rows.append(cells)
        out += _table(["model", *(f"ctx {c}" for c in dec["contexts"]), f"{hi}/{lo}"], rows)
    targets = result.get("targets") or {}
    if targets:
        out += ["", "Targets:"]
        for t in targets.values():
            met = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
            measured = t["measured"]
            if isinstance(measured, float):
                measured = f"{measured:.2f}"
            out.append(f"  [{met}] {t['target']}: measured {measured}")
    return "\n".join(out)


def default_out_path() -> Path:
    return REPO_ROOT / "bench" / "results" / f"retnet_vs_transformer_{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Written to a temporary file beside ``path`` and moved over it: an interrupted write leaves the last
    complete file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


__all__ = [
    "BenchConfig",
    "MODELS",
    "build_model",
    "default_out_path",
    "evaluate_targets",
    "format_report",
    "linear_fit",
    "packed_position_ids",
    "run_benchmark",
    "write_json",
]
