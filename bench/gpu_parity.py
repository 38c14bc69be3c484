"""Model-level check of the GPU path: each bench entry's zoo model on CUDA (the Triton kernels, which ``zoo.ops``
dispatches to for CUDA tensors) against the same weights on the CPU (the chunked torch forms), in float32.

For every entry (one model per ``model_type`` / configuration; the ``*_package`` entries are CPU-only and left
out) it records the relative error ``‖gpu − cpu‖ / ‖cpu‖`` of

* the logits of one forward over ``T`` tokens,
* the gradient of the training loss for all parameters together (and the worst single parameter),
* decoding on the GPU: the logits of the last ``decode_steps`` tokens fed one at a time through the cache after a
  prefill, against the GPU's own forward without cache over each prefix (models that decode exactly); where
  decoding is approximate by design (Hyena's distilled filters, the entry's ``prepare_decode``), GPU decoding
  against CPU decoding after the same preparation on each;
* for an entry whose reference is transformers' class on the same weights: zoo against it, both on the GPU in
  float32 (``reference_on_gpu``). Where the GPU and CPU results differ by design (:data:`DEVICE_DEPENDENT`:
  Reformer's transformers-compatible hashing draws its rotations from the device's generator, as transformers
  does), that comparison is the pass mark instead of the CPU one.

The op tests check each kernel against its float64 oracle; this checks the models that compose them: dispatch,
layouts, packed and grouped arguments, dtype handling and the cache. ``--tolerance`` (default 1e-2) is the pass
mark; on an H200 every entry agreed to 2e-7 ... 2e-5 (``bench/results/gpu_h200_*``).

    python -m bench.gpu_parity [--entries ...] [--hidden-size 64] [--layers 2] [--length 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

from bench.harness import write_json
from bench.registry import load_entries
from bench.suite import forward_kwargs, make_ids
from zoo.models.utils import CACHE_NAME, output_cache


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _loss_and_grads(model, entry, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    kwargs = forward_kwargs(entry, ids)
    if entry.objective == "causal_lm":
        kwargs["use_cache"] = False
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@torch.no_grad()
def _decode_logits(model, ids, steps: int) -> torch.Tensor:
    """Logits of the last ``steps`` tokens, fed one at a time through the cache after a prefill of the rest."""
    T = ids.shape[1]
    out = model(input_ids=ids[:, : T - steps], use_cache=True)
    cache, logits = output_cache(out), []
    for t in range(T - steps, T):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: cache})
        cache = output_cache(out)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@torch.no_grad()
def _decode_error(model, entry, ids, steps: int) -> float:
    """Against a forward without cache over each prefix: the last row of ``ids[:, :t + 1]`` is what decoding
    token t must give (for most models the full forward's row t; LSH attention's buckets depend on the tokens
    after t too, so for Reformer only the prefix's forward is the reference)."""
    T = ids.shape[1]
    full = [model(input_ids=ids[:, : t + 1], use_cache=False, **forward_kwargs(entry, ids[:, : t + 1])).logits[:, -1]
            for t in range(T - steps, T)]  # fmt: skip
    return _rel(_decode_logits(model, ids, steps), torch.stack(full, 1))


@contextlib.contextmanager
def _backend(name: str | None):
    """``ZOO_BACKEND`` set to ``name`` inside the block (unchanged for None)."""
    old = os.environ.get("ZOO_BACKEND")
    if name is not None:
        os.environ["ZOO_BACKEND"] = name
    try:
        yield
    finally:
        if name is not None:
            if old is None:
                os.environ.pop("ZOO_BACKEND", None)
            else:
                os.environ["ZOO_BACKEND"] = old


def check_entry(
    entry, hidden: int, layers: int, length: int, steps: int, seed: int, device: str = "cuda",
    backend: str | None = None,
) -> dict:  # fmt: skip
    """The entry's model on ``device`` (with ``ZOO_BACKEND=backend`` when given) against a copy on the CPU with
    the default dispatch."""
    torch.manual_seed(seed)
    cpu = entry.make(hidden, layers, length + steps + 8).float().train()
    gpu = copy.deepcopy(cpu).to(device)
    ids = make_ids(1, length, seed, cpu.config.vocab_size)
    started = time.perf_counter()
    cpu_logits, cpu_grads = _loss_and_grads(cpu, entry, ids)
    with _backend(backend):
        gpu_logits, gpu_grads = _loss_and_grads(gpu, entry, ids.to(device))
        if device == "cuda":
            torch.cuda.synchronize()
    missing = sorted(set(cpu_grads) ^ set(gpu_grads))
    names = [n for n in cpu_grads if n in gpu_grads]
    # per parameter, among those whose gradient is not negligible (a key bias's is zero up to rounding)
    floor = 1e-4 * torch.cat([cpu_grads[n].flatten() for n in names]).norm()
    per_param = {n: _rel(gpu_grads[n], cpu_grads[n]) for n in names if cpu_grads[n].norm() > floor}
    record = {
        "params": sum(p.numel() for p in cpu.parameters()),
        "logits": _rel(gpu_logits, cpu_logits),
        "grads_all": _rel(torch.cat([gpu_grads[n].flatten() for n in names]),
                          torch.cat([cpu_grads[n].flatten() for n in names])),  # fmt: skip
        "grads_worst": max(per_param.items(), key=lambda kv: kv[1]) if per_param else None,
        "grads_missing_on_one_side": missing,
    }
    if "decode" in entry.workloads and entry.prepare_decode is None:
        gpu.eval()
        with _backend(backend):
            record["decode_vs_prefix_forward"] = _decode_error(gpu, entry, ids.to(device), steps)
    elif "decode" in entry.workloads:  # an approximate decoding (Hyena's distilled filters): the same on both
        cpu.eval(), gpu.eval()
        entry.prepare_decode(cpu, length)
        with _backend(backend):
            entry.prepare_decode(gpu, length)
            theirs = _decode_logits(gpu, ids.to(device), steps)
        record["prepared_decode_vs_cpu"] = _rel(theirs, _decode_logits(cpu, ids, steps))
    reference = entry.reference
    if reference is not None and reference.same_weights:
        with _backend(backend), torch.no_grad():
            theirs = reference.build(cpu).float().to(device).eval()
            gpu.eval()
            ids_d = ids.to(device)
            kwargs = forward_kwargs(entry, ids_d)
            record["reference_on_gpu"] = _rel(gpu(input_ids=ids_d, **kwargs).logits,
                                              theirs(input_ids=ids_d, **kwargs).logits)  # fmt: skip
    record["seconds"] = time.perf_counter() - started
    return record


# entries whose GPU result differs from the CPU one by design, and why
DEVICE_DEPENDENT = {
    "reformer_transformers": "transformers-compatible hashing draws its rotations from the device's generator "
    "(as transformers' Reformer does): CPU and GPU buckets differ, so zoo is checked against transformers' "
    "class on the GPU instead",
}

# entries also checked with another backend on the GPU, as "<entry>@<backend>"
ALSO = {"longformer": "flex", "bigbird": "flex"}


def default_entries() -> list[str]:
    names = [name for name in load_entries() if not name.endswith("_package")]
    return names + [f"{name}@{backend}" for name, backend in ALSO.items() if name in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", nargs="+", help="bench entry names, 'name@backend' to force a backend "
                   "(default: all but the CPU-only *_package ones, and longformer / bigbird also with flex)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--length", type=int, default=512, help="tokens of the forward and backward (default 512)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=1e-2, help="pass mark of every relative error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="where the second copy runs (default cuda; 'cpu' with "
                   "--backend compares two CPU backends)")
    p.add_argument("--backend", help="ZOO_BACKEND for the second copy (default: the device's own dispatch)")
    p.add_argument("--out", help="JSON file for the records")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_parity needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    entries = load_entries()
    names = args.entries or default_entries()
    unknown = sorted({n.split("@")[0] for n in names} - set(entries))
    if unknown:
        raise SystemExit(f"unknown bench entries {unknown}; known: {sorted(entries)}")
    records, failed = {}, []
    for name in names:
        try:
            base, _, backend = name.partition("@")
            rec = check_entry(entries[base], args.hidden_size, args.layers, args.length, args.decode_steps,
                              args.seed, device=args.device, backend=backend or args.backend)  # fmt: skip
            errors = [rec.get("decode_vs_prefix_forward", 0.0), rec.get("prepared_decode_vs_cpu", 0.0),
                      rec.get("reference_on_gpu", 0.0)]  # fmt: skip
            if base in DEVICE_DEPENDENT:
                rec["cpu_comparison_not_counted"] = DEVICE_DEPENDENT[base]
            else:
                errors += [rec["logits"], rec["grads_all"]]
            rec["passed"] = all(e < args.tolerance for e in errors) and not rec["grads_missing_on_one_side"]
        except Exception as exc:  # one entry's failure is recorded, the others still run
            rec = {"error": f"{type(exc).__name__}: {exc}"[:1000], "passed": False}
        records[name] = rec
        if not rec["passed"]:
            failed.append(name)
        worst = rec.get("grads_worst") or ("-", float("nan"))
        print(
            f"{name:22s} " + (f"ERROR {rec['error']}" if "error" in rec else
            f"logits {rec['logits']:.1e}  grads {rec['grads_all']:.1e} (worst {worst[1]:.1e} {worst[0]})  "
            f"decode {rec.get('decode_vs_prefix_forward', rec.get('prepared_decode_vs_cpu', float('nan'))):.1e}  "
            f"ref {rec.get('reference_on_gpu', float('nan')):.1e}  {'ok' if rec['passed'] else 'FAIL'}"),
            flush=True,
        )  # fmt: skip
        if args.out:
            result = {
                "what": "zoo model on CUDA (Triton) vs the same weights on the CPU (torch), float32, relative errors",
                "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                "torch": torch.__version__,
                "config": vars(args),
                "entries": records,
            }
            write_json(result, args.out)
    print(f"{len(names) - len(failed)}/{len(names)} entries within {args.tolerance:g}; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
