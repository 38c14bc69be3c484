"""Every Triton kernel in zoo.ops compiles for the GPUs models train on, at the head sizes the configs use.

The kernels are compiled ahead of time for sm_80 (A100) and sm_90 (H100) on this CPU (``triton.compile`` with a
``GPUTarget`` needs no GPU; see ``harness.compile_for_gpu``): a kernel needing more shared memory than the
target has would fail to launch there, and this catches it without one. Register spills are printed (run with
``-s`` for the table) and warned about, not failed.

An op enters by one entry in ``OPS``: its module of kernels, a function running the op's Triton backend (forward
and backward) at two sizes (e.g. the head sizes Dk, Dv) and an input dtype, and the sizes its configs use. The
launches are recorded, not run, so any size is cheap; every kernel of the module must be among them, so a kernel
added to the module later is checked too.
"""

from __future__ import annotations

import functools
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

pytest.importorskip("triton")

from zoo.models.mamba.configuration_mamba import ZooMambaConfig  # noqa: E402
from zoo.models.retnet.configuration_retnet import RetNetConfig  # noqa: E402

from .harness import (  # noqa: E402
    GPU_TARGETS,
    check_fits_gpu,
    compile_for_gpu,
    record_triton_launches,
    triton_kernels,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_sizes(config_class, sizes) -> list[tuple[int, int]]:
    """``sizes(config)`` of ``config_class``'s defaults and of every ``configs/*/*.yaml`` model of its type."""
    configs = [config_class()]
    for path in sorted(CONFIGS.glob("*/*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        if model.get("type") == config_class.model_type:
            configs.append(config_class(**{n: v for n, v in model.items() if n != "type"}))
    return sorted({sizes(c) for c in configs})


# float32 inputs run IEEE float32 dots, 16-bit inputs tf32 ones: different code, different shared memory
DTYPES = (torch.float32, torch.bfloat16)


def run_retention(Dk: int, Dv: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton retention with every feature on (two packed sequences, per-token gates,
    initial and final states, row sums), so that every kernel is launched in its largest variant."""
    from zoo.ops.retention import retention
    from zoo.ops.retention import triton as kernels

    T, H = 80, 2

    def leaf(*shape, dtype=dtype):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    q, k, v = leaf(1, T, H, Dk), leaf(1, T, H, Dk), leaf(1, T, H, Dv)
    decay, h0 = leaf(1, T, H, dtype=torch.float32), leaf(2, H, Dk, Dv + 1, dtype=torch.float32)
    # the states kept for the backward (the recomputing variant launches the states kernel again, a subset)
    with mock.patch.object(kernels, "keep_chunk_states", lambda *sizes: True):
        out, state, _ = retention(
            q, k, v, decay, initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor([0, 50, T]),
            chunk_size=64, backend="triton", output_row_sum=True,
        )  # fmt: skip
    torch.autograd.backward([out, state], [torch.ones_like(out), torch.ones_like(state)])


def run_selective_scan(Dc: int, N: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton selective scan over packed sequences with initial and final states."""
    from zoo.ops.selective_scan import selective_scan

    T = 80
    x, dt, z = (torch.randn(1, T, Dc, dtype=dtype).requires_grad_() for _ in range(3))
    B, C = (torch.randn(1, T, N, dtype=dtype).requires_grad_() for _ in range(2))
    A, D, dt_bias = (t.requires_grad_() for t in (-torch.rand(Dc, N), torch.randn(Dc), torch.randn(Dc)))
    y, state = selective_scan(
        x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=True, initial_state=torch.randn(2, Dc, N).requires_grad_(),
        output_final_state=True, cu_seqlens=torch.tensor([0, 50, T]), backend="triton",
    )  # fmt: skip
    torch.autograd.backward([y, state], [torch.ones_like(y), torch.ones_like(state)])


def run_gla(Dk: int, Dv: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton GLA in both forms (GLA, and RWKV-6 with its bonus u) over two packed
    sequences with initial and final states, so that every kernel is launched in its largest variant."""
    from zoo.ops.gla import gla
    from zoo.ops.gla import triton as kernels

    T, H = 80, 2

    def leaf(*shape, dtype=dtype):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    for u in (None, leaf(H, Dk, dtype=torch.float32)):
        q, k, v = leaf(1, T, H, Dk), leaf(1, T, H, Dk), leaf(1, T, H, Dv)
        g, h0 = leaf(1, T, H, Dk, dtype=torch.float32), leaf(2, H, Dk, Dv, dtype=torch.float32)
        with mock.patch.object(kernels, "keep_chunk_states", lambda *sizes: True):
            out, state = gla(
                q, k, v, g, u=u, initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor([0, 50, T]),
                chunk_size=64, backend="triton",
            )  # fmt: skip
        torch.autograd.backward([out, state], [torch.ones_like(out), torch.ones_like(state)])


def run_delta_rule(Dk: int, Dv: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton generalised delta rule over two packed sequences with initial and final
    states (RWKV-7's gates: a per-channel log-decay)."""
    from zoo.ops.delta_rule import dplr_delta_rule

    T, H = 80, 2
    q, k, a, b = (torch.randn(1, T, H, Dk, dtype=dtype).requires_grad_() for _ in range(4))
    v = torch.randn(1, T, H, Dv, dtype=dtype).requires_grad_()
    g = (-torch.rand(1, T, H, Dk)).to(dtype).requires_grad_()
    out, state = dplr_delta_rule(
        q, k, v, a, b, g, scale=1.0, initial_state=torch.randn(2, H, Dk, Dv).requires_grad_(),
        output_final_state=True, cu_seqlens=torch.tensor([0, 50, T]), backend="triton",
    )  # fmt: skip
    torch.autograd.backward([out, state], [torch.ones_like(out), torch.ones_like(state)])


def run_wkv4(C: int, N: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton WKV4 over N packed sequences with initial and final states."""
    from zoo.ops.wkv4 import wkv4

    T = 80
    k, v = (torch.randn(1, T, C, dtype=dtype).requires_grad_() for _ in range(2))
    h0 = torch.stack([torch.randn(N, C), torch.rand(N, C) + 0.5, torch.randn(N, C)], 1).requires_grad_()
    w, u = (-torch.rand(C)).requires_grad_(), torch.randn(C).requires_grad_()
    cu_seqlens = torch.linspace(0, T, N + 1).long()
    y, state = wkv4(
        w, u, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend="triton",
    )  # fmt: skip
    torch.autograd.backward([y, state], [torch.ones_like(y), torch.ones_like(state)])


def run_long_conv(C: int, L: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton long convolution (C channels, a filter of L taps)."""
    from zoo.ops.long_conv import long_conv

    u, h = torch.randn(2, L, C, dtype=dtype).requires_grad_(), torch.randn(C, L, dtype=dtype).requires_grad_()
    long_conv(u, h, backend="triton")[0].sum().backward()


def run_causal_conv1d(C: int, K: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton causal conv1d (C channels, K taps) with every feature on: bias, SiLU,
    two packed sequences with initial and final states."""
    from zoo.ops.causal_conv1d import causal_conv1d

    T = 80
    x, w, b = (torch.randn(*shape, dtype=dtype).requires_grad_() for shape in ((1, T, C), (C, K), (C,)))
    h0 = torch.randn(2, C, K - 1, dtype=dtype).requires_grad_()
    y, state = causal_conv1d(
        x, w, b, activation="silu", initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor([0, 50, T]),
        backend="triton",
    )  # fmt: skip
    torch.autograd.backward([y, state], [torch.ones_like(y), torch.ones_like(state)])


def run_lsh_attention(D: int, chunk: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton LSH attention (head size D, chunks of ``chunk`` slots) with every mask on:
    causal, padding, two packed segments, two hashing rounds."""
    from zoo.ops.lsh_attention import lsh_attention

    T, H = 4 * chunk, 2
    qk, v = (torch.randn(1, T, H, D, dtype=dtype).requires_grad_() for _ in range(2))
    mask = torch.ones(1, T, dtype=torch.long)
    mask[:, -3:] = 0
    out = lsh_attention(
        qk, v, buckets=torch.randint(0, 4, (1, H, 2, T)), num_buckets=4, chunk_length=chunk, causal=True,
        key_padding_mask=mask, segment_ids=(torch.arange(T) >= T // 2).long()[None], backend="triton",
    )  # fmt: skip
    out.sum().backward()


def run_compressive_memory(Dk: int, Dv: int, dtype: torch.dtype) -> None:
    """Forward and backward of the Triton compressive memory over two packed sequences with initial and final
    states, in segments of 64 tokens. The delta rule only, to keep this file's time: the linear rule's variants are
    the same kernels without the delta rule's terms (at head size 64 they compile to 82-166 registers, no spills,
    against the delta rule's 132-186)."""
    from zoo.ops.compressive_memory import compressive_memory

    T, H = 80, 2
    q, k = (torch.randn(1, T, H, Dk, dtype=dtype).requires_grad_() for _ in range(2))
    v = torch.randn(1, T, H, Dv, dtype=dtype).requires_grad_()
    h0 = torch.cat([torch.randn(2, H, Dk, Dv), torch.rand(2, H, Dk, 1) + 1], -1).requires_grad_()
    out, state = compressive_memory(
        q, k, v, segment_length=64, update="delta", initial_state=h0, output_final_state=True,
        cu_seqlens=torch.tensor([0, 50, T]), backend="triton",
    )  # fmt: skip
    torch.autograd.backward([out, state], [torch.ones_like(out), torch.ones_like(state)])


# op: (module of kernels, run(size, size, dtype), sizes)
OPS = {
    # (Dk, Dv): RetNet's default (128, 256), tiny (32, 64), small (256, 512)
    "retention": (
        "zoo.ops.retention.triton",
        run_retention,
        config_sizes(RetNetConfig, lambda c: (c.head_dim, c.value_head_dim)),
    ),
    # (Dc, N): the inner width and state size of Mamba's configs
    "selective_scan": (
        "zoo.ops.selective_scan.triton",
        run_selective_scan,
        config_sizes(ZooMambaConfig, lambda c: (c.intermediate_size, c.state_size)),
    ),
    # (Dk, Dv): RWKV-6's head size 64, and the ends of the range GLA models use
    "gla": ("zoo.ops.gla.triton", run_gla, [(32, 32), (64, 64), (256, 256)]),
    # (Dk, Dv): RWKV-7's head size 64
    "delta_rule": ("zoo.ops.delta_rule.triton", run_delta_rule, [(64, 64)]),
    # (C, sequences): RWKV-4's widths (the kernel's blocks do not depend on them)
    "wkv4": ("zoo.ops.wkv4.triton", run_wkv4, [(768, 2), (2560, 2)]),
    # (C, L): Hyena's inner width and filter length (the kernel's blocks do not depend on them)
    "long_conv": ("zoo.ops.long_conv.triton", run_long_conv, [(64, 40)]),
    # (C, K): Mamba's inner width and kernel width (the kernels' blocks do not depend on C)
    "causal_conv1d": ("zoo.ops.causal_conv1d.triton", run_causal_conv1d, [(1536, 4)]),
    # (D, chunk): Reformer's default head size and chunk length
    "lsh_attention": ("zoo.ops.lsh_attention.triton", run_lsh_attention, [(64, 64)]),
    # (Dk, Dv): Infini-attention's default head size 64
    "compressive_memory": ("zoo.ops.compressive_memory.triton", run_compressive_memory, [(64, 64)]),
}


@functools.cache
def launches_of(op: str) -> dict:
    """The op's launches per (sizes, dtype): recorded by running it under the interpreter, not compiled."""
    _, run, all_sizes = OPS[op]
    return {
        (sizes, dtype): record_triton_launches(functools.partial(run, *sizes, dtype))
        for sizes in all_sizes
        for dtype in DTYPES
    }


@pytest.mark.parametrize("op", list(OPS))
def test_every_kernel_is_launched(op):
    """A kernel the call does not launch would go unchecked."""
    launches = launches_of(op)
    module = OPS[op][0]
    seen = {launch.kernel for found in launches.values() for launch in found}
    assert set(triton_kernels(module)) <= seen, f"not launched: {sorted(set(triton_kernels(module)) - seen)}"


@pytest.mark.parametrize("op", list(OPS))
def test_kernels_fit_gpu(op):
    """Every kernel of the op, at each of its sizes, compiled for every target: launched there, and within the
    target's shared memory (spills are reported, not failed). One test per op, so that under xdist one worker
    compiles an op's kernels once (compiling is most of this file's time); every failing case is listed."""
    module, _, all_sizes = OPS[op]
    launches = launches_of(op)
    results = compile_for_gpu([launch for found in launches.values() for launch in found], GPU_TARGETS)
    problems = []
    for kernel in triton_kernels(module):
        for sizes in all_sizes:
            mine = {launch for dtype in DTYPES for launch in launches[sizes, dtype] if launch.kernel == kernel}
            for cc in GPU_TARGETS:
                found = [r for r in results if r.launch in mine and r.cc == cc]
                if not found:
                    problems.append(f"{kernel} was not launched at sizes {sizes} (sm{cc})")
                    continue
                try:
                    check_fits_gpu(found, what=f"{kernel} at sizes {sizes}")
                except AssertionError as err:
                    problems.append(str(err))
    assert not problems, f"{op}: " + "\n".join(problems)


def test_sizes_follow_the_configs():
    """RetNet's defaults (Dk 128 / Dv 256) and its configs' (tiny 32 / 64, small 256 / 512); Mamba's default
    (1536 channels, state 16) and tiny (256)."""
    assert {(32, 64), (128, 256), (256, 512)} <= set(OPS["retention"][2])
    assert {(256, 16), (1536, 16)} <= set(OPS["selective_scan"][2])
