"""Child process of the memory measurement: ``python -m bench.memprobe '<json spec>'``.

For each ``[model, seq_len]`` of the spec (in order), in this fresh process:

1. build the model (seeded), make the input, collect garbage, read ``VmRSS`` (the baseline);
2. reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), so ``VmHWM`` restarts at the
   current resident set; if that is not possible, the baseline is ``ru_maxrss`` (the peak so far) instead;
   (before the first run of a model, one untimed 32-token step absorbs one-off allocations);
3. run one training step (forward + backward, gradients released), read ``VmHWM``: ``peak_bytes`` is the
   difference;
4. count the bytes autograd saves for backward in one more forward (distinct storages, parameters excluded).

The suite (:mod:`bench.suite`) sends the other form of spec: ``{"entries": {"hidden_size", "layers", "max_len":
{entry: T}}, "runs": [[entry name, T], ...]}``; each entry's model is built by :mod:`bench.registry` and stepped
with the entry's own loss (causal or masked LM).

One JSON object per run is printed on stdout. The parent sets ``MALLOC_MMAP_THRESHOLD_`` so that every large
tensor is its own mmap, returned to the OS when freed: resident memory then follows live memory, and a later run
in the same process starts from a clean baseline.
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import torch

from bench.harness import build_model, random_ids, train_step

WARMUP_TOKENS = 32


def _status_kib() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0])
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_for_backward_bytes(model: torch.nn.Module, ids: torch.Tensor, loss_fn=None) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one training forward (``loss_fn(model, ids)``;
    default: the causal-LM loss)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, ids) if loss_fn else model(input_ids=ids, labels=ids, use_cache=False).loss
    del loss
    return sum(seen.values())


def measure(model: torch.nn.Module, ids: torch.Tensor, step=None, loss_fn=None) -> dict:
    """Peak of one training step (``step(model, ids)``; default the causal-LM step) and the saved bytes."""
    step = step or train_step
    model.train()
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _status_kib()
    if _reset_peak():
        base_kib, method = _status_kib()["VmRSS"], "VmHWM - VmRSS (peak reset)"
    else:
        base_kib, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss delta"
    step(model, ids)
    peak_kib = (
        _status_kib()["VmHWM"]
        if method.startswith("VmHWM")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return {
        "peak_bytes": max(peak_kib - base_kib, 0) * 1024,
        "baseline_rss_bytes": before["VmRSS"] * 1024,
        "method": method,
        "saved_for_backward_bytes": saved_for_backward_bytes(model, ids, loss_fn),
    }


def _entry_runs(spec: dict) -> None:
    """The suite's form of the spec (``bench.suite``): ``entries`` holds the size, ``runs`` [entry name, T]."""
    from bench.registry import load_entries
    from bench.suite import forward_kwargs, make_ids
    from bench.suite import train_step as entry_step

    entries, sizes = load_entries(), spec["entries"]
    current: tuple[str, torch.nn.Module] | None = None
    for name, length in spec["runs"]:
        entry = entries[name]
        if current is None or current[0] != name:
            current = None
            gc.collect()
            torch.manual_seed(spec["seed"])
            model = entry.make(sizes["hidden_size"], sizes["layers"], sizes["max_len"][name]).train()
            current = (name, model)
            entry_step(model, entry, make_ids(1, WARMUP_TOKENS, spec["seed"], model.config.vocab_size))
        model = current[1]

        def loss_fn(m, ids, entry=entry):
            extra = {"use_cache": False} if entry.objective == "causal_lm" else {}
            return m(input_ids=ids, labels=ids, **forward_kwargs(entry, ids), **extra).loss

        ids = make_ids(1, length, spec["seed"] + length, model.config.vocab_size)
        step = lambda m, x, entry=entry: entry_step(m, entry, x)
        record = {"model": name, "seq_len": length, **measure(model, ids, step, loss_fn)}
        print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> None:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    torch.set_num_threads(spec["threads"])
    if "entries" in spec:
        _entry_runs(spec)
        return
    models: dict[str, torch.nn.Module] = {}
    for name, length in spec["runs"]:
        if name not in models:
            models.clear()
            gc.collect()
            models[name] = build_model(name, spec["models"][name], spec["seed"])
            # One short untimed step first: lazy one-off allocations (thread pools, kernel caches) are not
            # memory of a training step at any length, and stay in the baseline of the measured step.
            train_step(models[name], random_ids(spec["vocab_size"], WARMUP_TOKENS, spec["seed"]))
        ids = random_ids(spec["vocab_size"], length, spec["seed"] + length)
        record = {"model": name, "seq_len": length, **measure(models[name], ids)}
        print(json.dumps(record), flush=True)
        del ids


if __name__ == "__main__":
    main()
