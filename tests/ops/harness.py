"""The op test harness: every fast form of every op in ``zoo.ops`` is checked against its naive oracle, and every
Triton kernel is compiled for the GPUs it must launch on.

An op is any callable ``fn(**inputs) -> out`` or ``-> (out, final_state, ...)``; ``inputs`` is a dict of
tensors and plain arguments built by the op's own test file (its input factory). The checks are generic:

- ``check_forward_backward``: every output and the gradient of every floating input (initial state and decay
  included) against the reference, in relative error ``rel_err`` under a stated tolerance.
- ``check_state_chaining``: two halves, the second starting from the first's final state, equal the whole.
- ``check_varlen``: sequences packed along time with ``cu_seqlens`` equal separate calls, forward and backward.
- ``check_step``: decoding token by token with the op's ``*_step`` equals the full forward.
- ``record_triton_launches`` / ``compile_for_gpu`` / ``check_fits_gpu``: the Triton kernels a call launches,
  compiled ahead of time for sm_80 / sm_90 on this CPU (no GPU needed): shared memory within the target's limit,
  register spills reported (``test_triton_gpu_compile.py`` runs them for every op with Triton kernels).

Errors are elementwise: ``rel_err(a, b) = max |a - b| / max |b|`` per tensor, so that one wrong element of a
large tensor is not averaged away. Tolerances (``TOLERANCE``), from the errors the op tests observe, with a margin:
1e-11 for a float64 run against the float64 oracle (observed up to 4e-14); 5e-5 for a float32 run (Triton under
the CPU interpreter) against the float64 oracle (observed up to 7e-6; a test whose math loses more in float32
states its own tolerance and why).

Recurrent ops follow the fla convention: ``initial_state``/``output_final_state``/``cu_seqlens`` keywords,
outputs ``(out, final_state)`` with ``out`` batch-first and time on axis 1 (``seq_dims`` says where time is in
each input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

TOLERANCE = {torch.float64: 1e-11, torch.float32: 5e-5}

Inputs = Mapping[str, Any]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| in float64, elementwise (plain max |a − b| when b is zero, so that zero == zero
    passes; nan when either holds a nan)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    if a.isnan().any() or b.isnan().any():
        return float("nan")
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(errors: dict[str, float], tol: float, what: str) -> None:
    """Fail listing every quantity over ``tol``, and all errors for context."""
    bad = {name: err for name, err in errors.items() if not err < tol}  # `not <` also catches nan
    summary = ", ".join(f"{name}={err:.2e}" for name, err in errors.items())
    assert not bad, f"{what}: relative error over {tol:.0e} for {sorted(bad)} ({summary})"


def clone_inputs(
    inputs: Inputs, dtype: torch.dtype | None = None, requires_grad: bool = True
) -> dict[str, Any]:
    """Fresh leaves: floating tensors cast to ``dtype`` (if given), requiring grad; the rest as they are."""
    out: dict[str, Any] = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().to(dtype or x.dtype).clone().requires_grad_(requires_grad)
        out[name] = x
    return out


def _as_tuple(outputs: Any) -> tuple[torch.Tensor | None, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _weights(outputs: Sequence[torch.Tensor | None], seed: int = 1234) -> list[torch.Tensor | None]:
    """Fixed random cotangents, one per output, so that every element of every output reaches the grads."""
    gen = torch.Generator().manual_seed(seed)
    return [
        None if o is None else torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
        for o in outputs
    ]


def _loss(outputs: Sequence[torch.Tensor | None], weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
    terms = [(o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights) if o is not None]
    return torch.stack([t.double() for t in terms]).sum()


def _grads(loss: torch.Tensor, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


def _float_leaves(inputs: Inputs) -> dict[str, torch.Tensor]:
    return {n: x for n, x in inputs.items() if isinstance(x, torch.Tensor) and x.requires_grad}


def check_forward_backward(
    fn: Callable[..., Any],
    ref: Callable[..., Any],
    inputs: Inputs,
    *,
    dtype: torch.dtype | None = None,
    tol: float | None = None,
    what: str = "",
) -> dict[str, float]:
    """Compare ``fn`` (run in ``dtype``) with ``ref`` (in float64): every output, then every input's grad.

    ``inputs`` is the op's input dict; all floating tensors in it are differentiated. The loss is a fixed
    random projection of all outputs. Returns the relative errors by name (``out0``, ``out1``, ...,
    ``d<input>``).
    """
    dtype = dtype or torch.float64
    tol = TOLERANCE[dtype] if tol is None else tol
    ref_in = clone_inputs(inputs, torch.float64)
    fn_in = clone_inputs(inputs, dtype)
    ref_out = _as_tuple(ref(**ref_in))
    fn_out = _as_tuple(fn(**fn_in))
    assert len(ref_out) == len(fn_out), f"{what}: {len(fn_out)} outputs, the reference has {len(ref_out)}"

    errors: dict[str, float] = {}
    for i, (a, b) in enumerate(zip(fn_out, ref_out)):
        assert (a is None) == (b is None), f"{what}: output {i} is None in one form only"
        if b is not None:
            errors[f"out{i}"] = rel_err(a, b)
    weights = _weights(ref_out)
    ref_grads = _grads(_loss(ref_out, weights), _float_leaves(ref_in))
    fn_grads = _grads(_loss(fn_out, weights), _float_leaves(fn_in))
    for name, b in ref_grads.items():
        a = fn_grads[name]
        assert b is not None, f"{what}: the reference gives no gradient for {name}"
        assert a is not None, f"{what}: no gradient for {name}"
        assert a.dtype == fn_in[name].dtype, (
            f"{what}: d{name} has dtype {a.dtype}, its input {fn_in[name].dtype}"
        )
        errors[f"d{name}"] = rel_err(a, b)
    assert_close(errors, tol, what or "forward/backward")
    return errors


def _slice_time(inputs: Inputs, seq_dims: Mapping[str, int], start: int, stop: int) -> dict[str, Any]:
    out = dict(inputs)
    for name, dim in seq_dims.items():
        if isinstance(inputs.get(name), torch.Tensor):
            out[name] = inputs[name].narrow(dim, start, stop - start)
    return out


def check_state_chaining(
    fn: Callable[..., Any],
    inputs: Inputs,
    *,
    split: int,
    seq_dims: Mapping[str, int],
    tol: float,
    state_key: str = "initial_state",
    what: str = "",
) -> dict[str, float]:
    """Run the whole sequence, then [0, split) and [split, T) with the first half's final state passed on.

    Outputs (``out`` on time axis 1) and final states must agree; ``inputs`` must hold ``state_key``.
    """
    whole_out, whole_state = fn(**inputs, output_final_state=True)[:2]
    T = whole_out.shape[1]
    first_out, mid_state = fn(**_slice_time(inputs, seq_dims, 0, split), output_final_state=True)[:2]
    second_in = _slice_time(inputs, seq_dims, split, T)
    second_in[state_key] = mid_state
    second_out, last_state = fn(**second_in, output_final_state=True)[:2]
    errors = {
        "out": rel_err(torch.cat([first_out, second_out], dim=1), whole_out),
        "final_state": rel_err(last_state, whole_state),
    }
    assert_close(errors, tol, what or "state chaining")
    return errors


def check_varlen(
    fn: Callable[..., Any],
    sequences: Sequence[Inputs],
    *,
    seq_dims: Mapping[str, int],
    tol: float,
    batch_keys: Sequence[str] = ("initial_state",),
    what: str = "",
) -> dict[str, float]:
    """Packed sequences (batch 1, ``cu_seqlens``) equal separate calls: outputs, final states, gradients.

    ``sequences`` are per-sequence input dicts with batch 1. Inputs in ``seq_dims`` are concatenated along
    time, those in ``batch_keys`` along the batch axis (one row per sequence); anything else (e.g. a per-head
    decay) is shared and taken from the first sequence. The packed tensors are built from the same leaves as
    the separate calls, so the gradients of the two runs can be compared leaf by leaf.
    """
    leaves = [clone_inputs(s) for s in sequences]
    shared = {n: x for n, x in leaves[0].items() if n not in seq_dims and n not in batch_keys}
    for seq in leaves:
        seq.update(shared)

    separate = [fn(**seq, output_final_state=True)[:2] for seq in leaves]
    lengths = [out.shape[1] for out, _ in separate]
    device = separate[0][0].device
    cu_seqlens = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device
    )
    packed_in = dict(shared)
    for name, dim in seq_dims.items():
        packed_in[name] = torch.cat([seq[name] for seq in leaves], dim=dim)
    for name in batch_keys:
        if leaves[0].get(name) is not None:
            packed_in[name] = torch.cat([seq[name] for seq in leaves], dim=0)
    packed_out, packed_state = fn(**packed_in, output_final_state=True, cu_seqlens=cu_seqlens)[:2]

    sep_out = torch.cat([o for o, _ in separate], dim=1)
    sep_state = torch.cat([s for _, s in separate], dim=0)
    errors = {"out": rel_err(packed_out, sep_out), "final_state": rel_err(packed_state, sep_state)}

    w_out, w_state = _weights([sep_out, sep_state])
    all_leaves = {f"{n}[{i}]": x for i, seq in enumerate(leaves) for n, x in _float_leaves(seq).items()}
    g_sep = _grads(_loss([sep_out, sep_state], [w_out, w_state]), all_leaves)
    g_packed = _grads(_loss([packed_out, packed_state], [w_out, w_state]), all_leaves)
    for name in all_leaves:
        if g_sep[name] is not None or g_packed[name] is not None:
            assert g_sep[name] is not None and g_packed[name] is not None, f"{what}: {name} lost its gradient"
            errors[f"d{name}"] = rel_err(g_packed[name], g_sep[name])
    assert_close(errors, tol, what or "varlen")
    return errors


def check_step(
    fn: Callable[..., Any],
    step_fn: Callable[[dict[str, Any], torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    inputs: Inputs,
    *,
    seq_dims: Mapping[str, int],
    tol: float,
    state_key: str = "initial_state",
    what: str = "",
) -> dict[str, float]:
    """Decoding token by token, ``step_fn(token_inputs, state) -> (out_t, state)``, equals the full forward.

    ``token_inputs`` are ``inputs`` sliced to one token along time (the time axis kept, length 1), without
    ``state_key``; the first state is ``inputs[state_key]``. ``out_t`` has time on axis 1 with length 1.
    """
    with torch.no_grad():
        full_out, full_state = fn(**inputs, output_final_state=True)[:2]
        state = inputs[state_key]
        outs = []
        for t in range(full_out.shape[1]):
            token = _slice_time(inputs, seq_dims, t, t + 1)
            token.pop(state_key, None)
            out_t, state = step_fn(token, state)
            outs.append(out_t)
    errors = {"out": rel_err(torch.cat(outs, dim=1), full_out), "final_state": rel_err(state, full_state)}
    assert_close(errors, tol, what or "step")
    return errors


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels compiled for GPU targets, on a CPU
#
# Under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU) every ``@triton.jit`` function, triton's own
# library included, is an interpreted function that the compiler cannot take. So the launches of an op are recorded
# here without running them (their kernel, argument types, constexprs and options), and compiled in subprocesses
# without the interpreter: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` needs no GPU, and
# the ptxas bundled with triton reports registers and spills.

# Shared memory one block may use, in bytes: sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
GPU_TARGETS = tuple(SHARED_MEMORY_LIMIT)

_TRITON_TYPES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclasses.dataclass(frozen=True)
class TritonLaunch:
    """One kernel launch as the compiler sees it."""

    module: str  # where the kernel is defined
    kernel: str  # its name there
    signature: tuple[tuple[str, str], ...]  # (argument, type) in order: "*fp32", "i32", "fp32", "constexpr"
    constexprs: tuple[tuple[str, Any], ...]  # (argument, value)
    aligned: tuple[int, ...]  # arguments divisible by 16 (pointers: their address), as the JIT marks them
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        """The kernel and the constexprs that set its sizes, for messages."""
        sizes = ", ".join(f"{n}={v}" for n, v in self.constexprs if not isinstance(v, bool))
        types = sorted({t for _, t in self.signature if t.startswith("*")} - {"*i32", "*i64"})
        return f"{self.kernel}({sizes}; {'/'.join(types)}; warps={self.num_warps}, stages={self.num_stages})"


@dataclasses.dataclass(frozen=True)
class GpuCompileResult:
    """What compiling one launch for one target gave."""

    launch: TritonLaunch
    cc: int  # compute capability: 80, 90
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spill_stores: int  # bytes per thread; -1 where ptxas reported nothing
    spill_loads: int

    def describe(self) -> str:
        spills = (
            f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded"
            if self.spill_stores >= 0
            else "spills unknown (no ptxas report)"
        )
        return (
            f"sm_{self.cc} {self.launch.describe()}: shared {self.shared} B "
            f"(limit {SHARED_MEMORY_LIMIT[self.cc]}), {self.registers} registers, {spills}"
        )


def _is_constexpr(annotation: Any) -> bool:
    import triton.language as tl

    if isinstance(annotation, str):  # modules with ``from __future__ import annotations``
        return annotation.split(".")[-1] == "constexpr"
    return annotation is tl.constexpr


def _scalar_type(value: Any) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__} for the compiler")


def _describe_launch(kernel: Any, args: tuple, kwargs: dict) -> TritonLaunch:
    fn = kernel.fn  # the Python function behind a JITFunction or an interpreted one
    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **{n: v for n, v in kwargs.items() if n in params})
    bound.apply_defaults()
    options = {n: v for n, v in kwargs.items() if n not in params}
    signature, constexprs, aligned = [], [], []
    for i, (name, param) in enumerate(params.items()):
        value = bound.arguments[name]
        if _is_constexpr(param.annotation) or value is None:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((name, "*" + _TRITON_TYPES[value.dtype]))
            if value.data_ptr() % 16 == 0:
                aligned.append(i)
        else:
            signature.append((name, _scalar_type(value)))
            if isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0:
                aligned.append(i)
    return TritonLaunch(
        module=fn.__module__,
        kernel=fn.__name__,
        signature=tuple(signature),
        constexprs=tuple(constexprs),
        aligned=tuple(aligned),
        num_warps=int(options.get("num_warps", 4)),
        num_stages=int(options.get("num_stages", 3)),
    )


def record_triton_launches(run: Callable[[], Any]) -> list[TritonLaunch]:
    """Call ``run`` (an op's forward and backward) with every Triton launch recorded instead of run.

    Nothing is computed: the outputs of the kernels stay as allocated, which is enough for the host code around
    them to go on to the next launch. Returns the distinct launches, in the order first seen.
    """
    from triton.runtime.jit import KernelInterface

    launches: list[TritonLaunch] = []

    def launcher(kernel, grid):
        return lambda *args, **kwargs: launches.append(_describe_launch(kernel, args, kwargs))

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = launcher
    try:
        run()
    finally:
        KernelInterface.__getitem__ = original
    return list(dict.fromkeys(launches))


def triton_kernels(module_name: str) -> list[str]:
    """Names of the ``@triton.jit`` kernels defined in a module (interpreted or not)."""
    from triton.runtime.jit import KernelInterface

    module = importlib.import_module(module_name)
    return [
        name
        for name, obj in vars(module).items()
        if isinstance(obj, KernelInterface) and getattr(obj.fn, "__module__", None) == module_name
    ]


def compile_for_gpu(
    launches: Iterable[TritonLaunch], targets: Iterable[int] = GPU_TARGETS
) -> list[GpuCompileResult]:
    """Compile every launch for every target (compute capabilities, e.g. 80, 90) in subprocesses without the
    interpreter, as many as there are CPUs; a fresh triton cache, so that ptxas runs and reports every kernel."""
    jobs = [(launch, cc) for launch in dict.fromkeys(launches) for cc in targets]
    if not jobs:
        return []
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    shares = [jobs[i::workers] for i in range(workers)]
    repo_root = str(Path(__file__).resolve().parents[2])
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="zoo-triton-compile-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        procs = []
        for i, share in enumerate(shares):
            job_file, result_file = Path(tmp, f"jobs{i}.json"), Path(tmp, f"results{i}.json")
            job_file.write_text(json.dumps([dataclasses.asdict(launch) | {"cc": cc} for launch, cc in share]))
            cmd = [sys.executable, str(Path(__file__).resolve()), str(job_file), str(result_file)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append((proc, result_file))
        results: list[GpuCompileResult] = []
        failures = []
        for (proc, result_file), share in zip(procs, shares):
            _, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"{[l.describe() for l, _ in share]}:\n{err.decode()[-4000:]}")
                continue
            for (launch, cc), r in zip(share, json.loads(result_file.read_text())):
                results.append(GpuCompileResult(launch=launch, cc=cc, **r))
    if failures:
        raise AssertionError("compiling Triton kernels for a GPU failed:\n" + "\n".join(failures))
    return results


def _compile_jobs(job_file: str, result_file: str) -> None:
    """Subprocess side of ``compile_for_gpu`` (no interpreter here: the kernels are JITFunctions)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # ptxas' report (registers, spills) is printed when asked for; it is captured below
    knobs.nvidia.dump_ptxas_log = True
    results = []
    for job in json.loads(Path(job_file).read_text()):
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        src = ASTSource(
            fn=kernel,
            signature=dict(job["signature"]),
            constexprs=dict(job["constexprs"]),
            attrs={(i,): [["tt.divisibility", 16]] for i in job["aligned"]},
        )
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", job["cc"], 32),
                options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
            )
        report = log.getvalue()
        registers = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        results.append(
            {
                "shared": int(compiled.metadata.shared),
                "registers": max(registers, default=-1),
                "spill_stores": max((int(st) for st, _ in spills), default=-1),
                "spill_loads": max((int(ld) for _, ld in spills), default=-1),
            }
        )
    Path(result_file).write_text(json.dumps(results))


class RegisterSpillWarning(UserWarning):
    """A kernel spills registers on a GPU target: it still launches, only slower."""


def check_fits_gpu(results: Iterable[GpuCompileResult], what: str = "") -> None:
    """Every compiled kernel fits the shared memory of its target; register spills are printed and warned about,
    not failed. Every result is printed (``pytest -s`` shows the table)."""
    results = list(results)
    for r in results:
        print(r.describe())
    spilling = [r.describe() for r in results if r.spill_stores > 0 or r.spill_loads > 0]
    if spilling:
        warnings.warn(f"{what}: register spills:\n" + "\n".join(spilling), RegisterSpillWarning, stacklevel=2)
    too_big = [r.describe() for r in results if r.shared > SHARED_MEMORY_LIMIT[r.cc]]
    assert not too_big, f"{what}: shared memory over the target's limit:\n" + "\n".join(too_big)


if __name__ == "__main__":
    _compile_jobs(*sys.argv[1:3])
