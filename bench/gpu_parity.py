"""Model-level check of the GPU path: each bench entry's zoo model on CUDA (the Triton kernels, which ``zoo.ops``
dispatches to for CUDA tensors) against the same weights on the CPU (the chunked torch forms), in float32.

For every entry (one model per ``model_type`` / configuration; the ``*_package`` entries are CPU-only and left
out) it records the relative error ``‖gpu − cpu‖ / ‖cpu‖`` of

* the logits of one forward over ``T`` tokens,
* the gradient of the training loss for all parameters together (and the worst single parameter),
* decoding on the GPU: the logits of the last ``decode_steps`` tokens fed one at a time through the cache after a
  prefill, against the GPU's own full forward (causal models that decode exactly; Hyena's decoding goes through
  distilled filters and is left out here).

The op tests check each kernel against its float64 oracle; this checks the models that compose them: dispatch,
layouts, packed and grouped arguments, dtype handling and the cache. Triton's float32 dots round their inputs to
tf32, so agreement is expected near 1e-3, not 1e-6; ``--tolerance`` (default 1e-2) is the pass mark.

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
def _decode_error(model, entry, ids, steps: int) -> float:
    kwargs = forward_kwargs(entry, ids)
    full = model(input_ids=ids, use_cache=False, **kwargs).logits
    T = ids.shape[1]
    out = model(input_ids=ids[:, : T - steps], use_cache=True)
    cache, logits = output_cache(out), []
    for t in range(T - steps, T):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: cache})
        cache = output_cache(out)
        logits.append(out.logits[:, -1])
    return _rel(torch.stack(logits, 1), full[:, T - steps :])


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
            record["decode_vs_full_forward"] = _decode_error(gpu, entry, ids.to(device), steps)
    record["seconds"] = time.perf_counter() - started
    return record


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
    p.add_argument("--out", help="JSON file for the records")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
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
                              args.seed, backend=backend or None)  # fmt: skip
            errors = [rec["logits"], rec["grads_all"], rec.get("decode_vs_full_forward", 0.0)]
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
            f"decode {rec.get('decode_vs_full_forward', float('nan')):.1e}  {'ok' if rec['passed'] else 'FAIL'}"),
            flush=True,
        )  # fmt: skip
        if args.out:
            result = {
                "what": "zoo model on CUDA (Triton) vs the same weights on the CPU (torch), float32, relative errors",
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "config": vars(args),
                "entries": records,
            }
            from bench.harness import write_json

            write_json(result, args.out)
    print(f"{len(names) - len(failed)}/{len(names)} entries within {args.tolerance:g}; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
