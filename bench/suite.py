"""``python -m bench``: every architecture's entry (:mod:`bench.registry`) through the same workloads, on one machine.

For each entry, in one process: the zoo model and its reference are built (same seed; a same-weights reference is
checked for equal logits first, and a disagreement is recorded and stops that entry's timings), then

* **train**: forward + backward of the entry's loss at each (batch, length), interleaved with the reference (A B,
  B A, ...); tokens/s and the reference / zoo time ratio per adjacent pair, median over pairs; **MFU** = the
  entry's training FLOPs (:mod:`bench.flops`, its family's counter) / step time / the matmul peak measured at the
  start of the same run;
* **prefill**: a forward without gradients (with the cache, for causal models) at each length, batch 1, interleaved
  with the reference: tokens/s;
* **decode**: ms per token of greedy single-token steps after a prefill of each context (zoo models: the entry and
  a zoo baseline reference; transformers' references are not decoded here);
* **memory**: peak resident memory and bytes saved for backward of one training step, in a child process
  (:mod:`bench.memprobe`);
* **profile**: one training step's time split into GEMMs / sequence mixing / rest (:mod:`bench.timesplit`).

Fits of log(time) and log(memory) against log(T) give each entry's scaling exponents; :mod:`bench.plots` draws
them. Timings are never asserted in tests (``tests/bench`` checks the schema at tiny sizes).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.flops import forward_flops, measured_matmul_flops, peak_matmul_flops, training_flops
from bench.harness import (
    REPO_ROOT,
    _decode_block,
    _gc_paused,
    _pair_order,
    _sync,
    linear_fit,
    machine_info,
    median,
)
from bench.registry import PENDING, Entry, load_entries
from zoo.training.allocator import libc_function

SCHEMA_VERSION = 1
MMAP_THRESHOLD = 65536
THIRD_PARTY = ("fla", "mamba_ssm", "flash_attn")

QUICK = {
    "hidden_size": 64,
    "layers": 2,
    "lengths": [64, 128, 256],
    "batch_sizes": [1, 2],
    "decode_contexts": [32, 256],
    "decode_steps": 4,
    "repeats": 2,
    "warmup": 1,
    "memory": "shared",
    "profile_length": 256,
    "peak_size": 512,
    # one thread: a smoke run on a shared machine is not held up by OpenMP threads waiting for each other
    "threads": 1,
}


@dataclass
class SuiteConfig:
    """Everything a run depends on; stored in the JSON. ``lengths`` None: each entry's own (its issue's)."""

    entries: list[str] | None = None  # None: every entry
    hidden_size: int = 256
    layers: int = 4
    lengths: list[int] | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    decode_steps: int = 16
    repeats: int = 3
    warmup: int = 1
    memory: str = "per-entry"  # per-entry | shared | off
    profile_length: int | None = 2048  # None: no profile
    peak_size: int = 2048
    device: str = "auto"  # auto | cpu | cuda
    reference_max_length: int | None = None  # references timed up to this T only (besides their own cap)
    threads: int | None = None
    keep_freed_memory: bool = False  # glibc keeps freed memory (zoo.training.allocator), for both models
    seed: int = 0
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.memory not in ("per-entry", "shared", "off"):
            raise ValueError(f"memory must be 'per-entry', 'shared' or 'off', got {self.memory!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("lengths", "batch_sizes", "decode_contexts"):
            values = getattr(self, name)
            if values is not None:
                if not values or any(v < 1 for v in values):
                    raise ValueError(f"{name} must be positive integers, got {values}")
                setattr(self, name, sorted(set(values)))
        if self.reference_max_length is not None and self.reference_max_length < 1:
            raise ValueError(f"reference_max_length must be positive, got {self.reference_max_length}")
        if self.repeats < 1 or self.warmup < 0 or self.decode_steps < 1:
            raise ValueError("repeats and decode_steps must be >= 1, warmup >= 0")
        if self.threads is None:
            self.threads = torch.get_num_threads()


# --------------------------------------------------------------------------------------------------- device


def select_device(requested: str = "auto") -> tuple[str, torch.dtype]:
    """``auto``: CUDA (the Triton kernels, bf16) when torch sees a GPU, else the CPU (torch path, fp32)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ValueError("device='cuda' but torch sees no CUDA device")
    if requested == "cuda" or (requested == "auto" and cuda):
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def third_party_status() -> dict[str, str]:
    """Which optional kernel libraries are installed (the GPU comparisons run only for those)."""
    return {
        name: "installed"
        if importlib.util.find_spec(name) is not None
        else f"not installed: {name} comparison skipped"
        for name in THIRD_PARTY
    }


# --------------------------------------------------------------------------------------------------- memory


def process_rss_bytes() -> int | None:
    """This process's resident set (``VmRSS``), None where ``/proc`` is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_TRIM = libc_function("malloc_trim")  # glibc's, or None (another C library)


def release_memory() -> dict:
    """Between workloads (never inside a timed region): collect cyclic garbage and hand the C allocator's free
    pages back to the OS. glibc serves tensors up to its (dynamic, up to 32 MiB) mmap threshold from its heaps and
    keeps what they free resident; after a step at 16K that is 1-2 GiB the next workload, or the next entry, may not
    reuse. Returns the resident set before and after, in bytes (None where unknown)."""
    before = process_rss_bytes()
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
    return {"rss_before_bytes": before, "rss_after_bytes": process_rss_bytes()}


# --------------------------------------------------------------------------------------------------- steps


def make_ids(batch: int, length: int, seed: int, vocab_size: int, device: str = "cpu") -> torch.Tensor:
    """Random tokens above the special ids 0-2 (RoBERTa-style models derive positions from the padding id)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=gen).to(device)


def forward_kwargs(entry: Entry, ids: torch.Tensor) -> dict:
    return entry.forward_kwargs(ids) if entry.forward_kwargs else {}


def train_step(model: torch.nn.Module, entry: Entry, ids: torch.Tensor) -> None:
    """Forward + backward of the entry's loss (causal LM, or an encoder's masked-LM loss on every token)."""
    kwargs = forward_kwargs(entry, ids)
    if entry.objective == "causal_lm":
        kwargs["use_cache"] = False
    model(input_ids=ids, labels=ids, **kwargs).loss.backward()
    model.zero_grad(set_to_none=True)


@torch.inference_mode()
def prefill_step(model: torch.nn.Module, entry: Entry, ids: torch.Tensor):
    kwargs = forward_kwargs(entry, ids)
    if entry.objective == "causal_lm":
        kwargs["use_cache"] = True
    return model(input_ids=ids, **kwargs)


@torch.no_grad()
def logits_error(
    model: torch.nn.Module, reference: torch.nn.Module, entry: Entry, ids: torch.Tensor
) -> float:
    kwargs = forward_kwargs(entry, ids)
    ours, theirs = (
        model(input_ids=ids, **kwargs).logits.float(),
        reference(input_ids=ids, **kwargs).logits.float(),
    )
    return ((ours - theirs).norm() / theirs.norm()).item()


def build_pair(entry: Entry, cfg: SuiteConfig, max_len: int, device: str, dtype: torch.dtype):
    torch.manual_seed(cfg.seed)
    model = entry.make(cfg.hidden_size, cfg.layers, max_len)
    reference = entry.reference.build(model) if entry.reference else None
    model = model.to(device=device, dtype=dtype).train()
    if reference is not None:
        reference = reference.to(device=device, dtype=dtype).train()
    return model, reference


# --------------------------------------------------------------------------------------------------- workloads


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _paired(models: dict, fn, repeats: int, device: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in models}
    gc.collect()
    with _gc_paused():
        for r in range(repeats):
            for name in _pair_order(r, list(models)):
                times[name].append(_timed(lambda name=name: fn(models[name]), device))
    return times


def _ratio(times: dict[str, list[float]]) -> dict:
    if "reference" not in times:
        return {}
    paired = [ref / ours for ref, ours in zip(times["reference"], times["zoo"])]
    return {"reference_over_zoo_paired": paired, "reference_over_zoo_median": median(paired)}


def time_training(entry, models, lengths, cfg, device, peak, progress) -> list[dict]:
    rows = []
    zoo = models["zoo"]
    for batch in cfg.batch_sizes:
        for length in lengths:
            ids = make_ids(batch, length, cfg.seed + length, zoo.config.vocab_size, device)
            timed = {
                n: m
                for n, m in models.items()
                if n == "zoo" or _reference_fits(entry, length, cfg.reference_max_length)
            }
            for _ in range(cfg.warmup):
                for model in timed.values():
                    train_step(model, entry, ids)
            progress(f"{entry.name} train B={batch} T={length}")
            times = _paired(timed, lambda m, ids=ids: train_step(m, entry, ids), cfg.repeats, device)
            flops = training_flops(zoo, entry.family, batch, length)
            step = median(times["zoo"])
            row = {
                "batch": batch,
                "seq_len": length,
                "zoo_step_s": times["zoo"],
                "zoo_tokens_per_s": batch * length / step,
                "training_flops": flops,
                "mfu": flops / step / peak["flops_per_s"],
            }
            if "reference" in times:
                row["reference_step_s"] = times["reference"]
                row["reference_tokens_per_s"] = batch * length / median(times["reference"])
                row.update(_ratio(times))
            rows.append(row)
            del ids
            release_memory()
    return rows


def _reference_fits(entry: Entry, length: int, cap: int | None = None) -> bool:
    """Whether the reference is timed at ``length``: within its own ``max_length`` and the run's ``cap``."""
    return (
        entry.reference is not None
        and (entry.reference.max_length is None or length <= entry.reference.max_length)
        and (cap is None or length <= cap)
    )


def time_prefill(entry, models, lengths, cfg, device, progress) -> list[dict]:
    rows = []
    for length in lengths:
        ids = make_ids(1, length, cfg.seed + 3 * length, models["zoo"].config.vocab_size, device)
        timed = {
            n: m.eval()
            for n, m in models.items()
            if n == "zoo" or _reference_fits(entry, length, cfg.reference_max_length)
        }
        for model in timed.values():
            prefill_step(model, entry, ids)
        progress(f"{entry.name} prefill T={length}")
        times = _paired(timed, lambda m, ids=ids: prefill_step(m, entry, ids), cfg.repeats, device)
        row = {"seq_len": length, "zoo_tokens_per_s": length / median(times["zoo"]), "zoo_s": times["zoo"]}
        if "reference" in times:
            row["reference_tokens_per_s"] = length / median(times["reference"])
            row.update(_ratio(times))
        rows.append(row)
        del ids
        release_memory()
    for model in models.values():
        model.train()
    return rows


def time_decode(entry, models, cfg, device, progress) -> dict:
    """ms per token after each context; the reference too when it is a zoo model, or declares
    ``decodes_with_cache`` (same cache interface)."""
    from zoo.models.utils import output_cache

    out: dict = {"contexts": cfg.decode_contexts, "steps": cfg.decode_steps}
    zoo_model = models["zoo"].eval()
    if entry.prepare_decode is not None:
        out["prepared"] = entry.prepare_decode(zoo_model, max(cfg.decode_contexts))
        release_memory()
    decoders = {"zoo": zoo_model}
    ref = models.get("reference")
    decodes = ref is not None and getattr(ref, "decodes_with_cache", False)
    if ref is not None and (type(ref).__module__.startswith("zoo.") or decodes):
        decoders["reference"] = ref.eval()
    for name, model in decoders.items():
        per_context = []
        for ctx in cfg.decode_contexts:
            progress(f"{entry.name} decode {name} ctx={ctx}")
            ids = make_ids(1, ctx, cfg.seed + 7 * ctx, model.config.vocab_size, device)
            with torch.inference_mode():
                first = prefill_step(model, entry, ids)
            state = {"cache": output_cache(first), "token": first.logits[:, -1:].argmax(-1), "context": ctx}
            del first, ids  # the prompt's logits at every position are not needed while decoding
            _decode_block(model, state, 2)  # untimed
            with _gc_paused():
                times = _decode_block(model, state, cfg.decode_steps)
            per_context.append({"context": ctx, "ms_per_token_median": 1e3 * median(times)})
            del state
            release_memory()
        out[name] = per_context
    for model in models.values():
        model.train()
    return out


def measure_memory(runs: list[tuple[str, int]], cfg: SuiteConfig, max_len: dict[str, int]) -> dict:
    """Child processes of :mod:`bench.memprobe`: one per entry (``per-entry``) or one for all (``shared``)."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    groups: dict[str, list] = {}
    for name, length in runs:
        groups.setdefault(name if cfg.memory == "per-entry" else "all", []).append([name, length])
    out: dict = {}
    for group in groups.values():
        spec = {
            "threads": cfg.threads,
            "seed": cfg.seed,
            "entries": {"hidden_size": cfg.hidden_size, "layers": cfg.layers, "max_len": max_len},
            "runs": group,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memprobe", json.dumps(spec)],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                out.setdefault(record["model"], []).append(record)
    return out


def measure_cuda_memory(
    entry: Entry, model: torch.nn.Module, lengths: list[int], cfg: SuiteConfig
) -> list[dict]:
    """On the GPU, in this process: torch.cuda's peak allocation of one training step above what was allocated
    before it, and the bytes saved for backward."""
    from bench.memprobe import saved_for_backward_bytes

    extra = {"use_cache": False} if entry.objective == "causal_lm" else {}
    loss_fn = lambda m, x: m(input_ids=x, labels=x, **forward_kwargs(entry, x), **extra).loss
    out = []
    for length in lengths:
        ids = make_ids(1, length, cfg.seed + length, model.config.vocab_size, "cuda")
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, entry, ids)
        torch.cuda.synchronize()
        out.append({
            "model": entry.name,
            "seq_len": length,
            "peak_bytes": torch.cuda.max_memory_allocated() - base,
            "method": "torch.cuda.max_memory_allocated - memory_allocated before the step",
            "saved_for_backward_bytes": saved_for_backward_bytes(model, ids, loss_fn),
        })  # fmt: skip
    return out


def loglog_exponent(xs, ys) -> float | None:
    """Slope of the least-squares line through (log x, log y): 1 = linear, 2 = quadratic."""
    pts = [(x, y) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    return linear_fit([math.log(x) for x, _ in pts], [math.log(y) for _, y in pts])["slope"]


# --------------------------------------------------------------------------------------------------- run


def run_entry(entry: Entry, cfg: SuiteConfig, device: str, dtype, peak: dict, progress) -> dict:
    from bench.timesplit import time_split

    lengths = cfg.lengths or list(entry.lengths)
    contexts = cfg.decode_contexts if "decode" in entry.workloads else []
    max_len = max([*lengths, *contexts, cfg.profile_length or 0]) + cfg.decode_steps + 8
    model, reference = build_pair(entry, cfg, max_len, device, dtype)
    result: dict = {
        "model_type": entry.model_type,
        "family": entry.family,
        "objective": entry.objective,
        "workloads": list(entry.workloads),
        "notes": entry.notes,
        "config": model.config.to_diff_dict(),
        "params": sum(p.numel() for p in model.parameters()),
        "lengths": lengths,
        "max_len": max_len,
    }
    models = {"zoo": model}
    # the resident set around each workload's release (bench.suite.release_memory): what the process holds
    result["process_memory"] = memory = {}
    if reference is not None:
        result["reference"] = {
            "name": entry.reference.name,
            "class": type(reference).__name__,
            "params": sum(p.numel() for p in reference.parameters()),
            "same_weights": entry.reference.same_weights,
            "max_length": entry.reference.max_length,
        }
        if entry.reference.same_weights:
            ids = make_ids(1, min(lengths[0], 256), cfg.seed + 1, model.config.vocab_size, device)
            # in float32 whatever the run's dtype (the same bf16-rounded weights on both sides): bf16 rounding,
            # or an LSH bucket it flips, would otherwise hide a real difference under a loose tolerance
            error = logits_error(model.float().eval(), reference.float().eval(), entry, ids)
            # a GPU's float32 kernels (cuBLAS, Triton) reduce in other orders and split sums differently than the
            # CPU's: Mamba-2 at width 1024 on an H200 agreed with transformers to 1.06e-4
            tolerance = entry.reference.tolerance if device == "cpu" else max(entry.reference.tolerance, 5e-4)
            check = {"relative_error": error, "tolerance": tolerance, "dtype": "float32", "tokens": ids.shape[1]}
            model.to(dtype), reference.to(dtype)
            if dtype != torch.float32:  # recorded, not judged
                check[f"relative_error_{str(dtype).removeprefix('torch.')}"] = logits_error(
                    model, reference, entry, ids
                )
            check["passed"] = error < tolerance
            result["reference"]["logits_check"] = check
            model.train(), reference.train()
            if not error < tolerance:
                result["error"] = f"zoo and reference logits disagree (relative error {error:.2e}): not timed"
                return result
        models["reference"] = reference
    ids = make_ids(1, min(lengths[0], 256), cfg.seed, model.config.vocab_size, device)
    try:
        result["flops_cross_check"] = {
            "analytic_forward": forward_flops(model, entry.family, 1, ids.shape[1]),
            "torch_flop_counter_forward": measured_matmul_flops(model, ids, **forward_kwargs(entry, ids)),
        }
    except Exception as exc:  # the cross-check is informative only
        result["flops_cross_check"] = {"error": repr(exc)[:300]}
    if "train" in entry.workloads:
        result["train"] = time_training(entry, models, lengths, cfg, device, peak, progress)
        memory["train"] = release_memory()
    if "prefill" in entry.workloads:
        result["prefill"] = time_prefill(entry, models, lengths, cfg, device, progress)
        memory["prefill"] = release_memory()
    if cfg.profile_length and "train" in entry.workloads:
        progress(f"{entry.name} profile T={cfg.profile_length}")
        pids = make_ids(1, cfg.profile_length, cfg.seed + 11, model.config.vocab_size, device)
        result["profile"] = {"seq_len": cfg.profile_length, **time_split(
            lambda: train_step(model, entry, pids), model, entry.mixers
        )}  # fmt: skip
        del pids
        memory["profile"] = release_memory()
    if device == "cuda" and "memory" in entry.workloads and cfg.memory != "off":
        progress(f"{entry.name} memory (torch.cuda)")
        result["memory"] = measure_cuda_memory(entry, model, lengths, cfg)
    if contexts:
        result["decode"] = time_decode(entry, models, cfg, device, progress)
        memory["decode"] = release_memory()
    return result


def _fits(result: dict) -> dict:
    fits: dict = {}
    rows = [r for r in result.get("train", []) if r["batch"] == min(r["batch"] for r in result["train"])]
    if rows:
        fits["train_time_exponent"] = loglog_exponent(
            [r["seq_len"] for r in rows], [median(r["zoo_step_s"]) for r in rows]
        )
        ref_rows = [r for r in rows if "reference_step_s" in r]
        fits["reference_train_time_exponent"] = loglog_exponent(
            [r["seq_len"] for r in ref_rows], [median(r["reference_step_s"]) for r in ref_rows]
        )
    memory = result.get("memory") or []
    if memory:
        fits["peak_memory_exponent"] = loglog_exponent(
            [m["seq_len"] for m in memory], [m["peak_bytes"] for m in memory]
        )
        fits["saved_for_backward_exponent"] = loglog_exponent(
            [m["seq_len"] for m in memory], [m["saved_for_backward_bytes"] for m in memory]
        )
    decode = result.get("decode")
    if decode:
        per = decode["zoo"]
        fits["decode_time_exponent"] = loglog_exponent(
            [d["context"] for d in per], [d["ms_per_token_median"] for d in per]
        )
    return fits


def run_suite(cfg: SuiteConfig, argv: list[str] | None = None, progress=None, on_entry=None) -> dict:
    """Every selected entry through its workloads. ``on_entry(result)``, when given, is called after each entry
    with the result so far (``result["complete"]`` false until the end), so that a long run that is stopped keeps
    what it measured."""
    torch.set_num_threads(cfg.threads)
    if cfg.keep_freed_memory:
        from zoo.training.allocator import keep_freed_memory

        keep_freed_memory()
    device, dtype = select_device(cfg.device)
    say = progress or (lambda text: None)
    entries = load_entries()
    names = cfg.entries or list(entries)
    unknown = sorted(set(names) - set(entries))
    if unknown:
        raise ValueError(f"unknown bench entries {unknown}; known: {sorted(entries)}")
    started = time.perf_counter()
    result: dict = {
        "schema_version": SCHEMA_VERSION,
        "command": ("python -m bench " + " ".join(shlex.quote(a) for a in (argv or []))).strip(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "config": asdict(cfg),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "pending": dict(PENDING),
        "complete": False,
        "entries": {},
    }
    if device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name()
        result["path"] = "Triton kernels (zoo.ops dispatch on CUDA), bf16"
    else:
        result["path"] = "torch CPU path (zoo.ops chunked forms), fp32"
    result["third_party"] = third_party_status()
    say("matmul peak")
    # a GPU needs large products to approach its peak; a CPU reaches it at ~1-2K
    size = max(cfg.peak_size, 8192) if device == "cuda" else cfg.peak_size
    result["peak_matmul"] = peak_matmul_flops(device, dtype, size=size)
    if device == "cuda":
        from bench.gpu import compare_kernels

        result["kernel_comparisons"] = compare_kernels(result["third_party"])
    memory_runs, max_lens = [], {}
    for name in names:
        entry = entries[name]
        say(f"{name}: build")
        try:
            record = run_entry(entry, cfg, device, dtype, result["peak_matmul"], say)
        except Exception as exc:  # one failing entry is recorded, the others still run
            record = {"model_type": entry.model_type, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        result["entries"][name] = record
        if "memory" in entry.workloads and cfg.memory != "off" and device == "cpu" and "error" not in record:
            memory_runs += [(name, length) for length in record["lengths"]]
            max_lens[name] = record["max_len"]
        # the entry's models are gone with run_entry's frame; their memory goes back before the next entry
        record.setdefault("process_memory", {})["after_entry"] = release_memory()
        if "error" not in record and (device == "cuda" or "memory" not in entry.workloads or cfg.memory == "off"):
            record["fits"] = _fits(record)
        if on_entry is not None:
            on_entry(result)
    if memory_runs:
        say("memory probes")
        measured = measure_memory(memory_runs, cfg, max_lens)
        for name, records in measured.items():
            result["entries"][name]["memory"] = records
    for record in result["entries"].values():
        if "error" not in record:
            record["fits"] = _fits(record)
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_time_s"] = time.perf_counter() - started
    result["complete"] = True
    return result


def default_out_dir() -> Path:
    return REPO_ROOT / "bench" / "results" / f"suite_{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = [
    "QUICK",
    "SuiteConfig",
    "process_rss_bytes",
    "release_memory",
    "run_suite",
    "select_device",
    "third_party_status",
]
