"""On a machine with a CUDA GPU (and without ``TRITON_INTERPRET=1``), the op tests run every Triton form on the GPU.

The op tests build their inputs on the CPU, where the float64 oracles run. Under the interpreter the Triton forms
take those CPU tensors as they are; compiled kernels cannot. So, when a GPU is there, each op's Triton entry point
(every ``triton_*`` function of a ``zoo.ops.<op>.triton`` module) is wrapped for the test: its tensor arguments are
copied to the GPU and its outputs copied back to where the inputs were. Both copies are differentiable, so the
harness compares outputs and gradients against the CPU oracle exactly as it does under the interpreter. On a CPU-only
machine nothing is wrapped.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pkgutil
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def on_gpu(fn):
    """``fn`` run on the GPU, its results returned on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        home = _first_tensor_device(args, kwargs)
        if home is None or home.type == "cuda":
            return fn(*args, **kwargs)
        gpu = torch.device("cuda")
        return _move(fn(*_move(args, gpu), **_move(kwargs, gpu)), home)

    return wrapper


def triton_entry_points() -> list[tuple[object, str]]:
    """(module, name) of every public ``triton_*`` function defined in a ``zoo.ops.<op>.triton`` module."""
    import zoo.ops

    found = []
    for info in pkgutil.iter_modules(zoo.ops.__path__):
        if not info.ispkg:
            continue
        try:
            module = importlib.import_module(f"zoo.ops.{info.name}.triton")
        except ModuleNotFoundError:
            continue
        for name, value in vars(module).items():
            if (
                name.startswith("triton_")
                and inspect.isfunction(value)
                and value.__module__ == module.__name__
            ):
                found.append((module, name))
    return found


@pytest.fixture(autouse=True)
def _triton_forms_on_gpu(monkeypatch):
    if ON_GPU:
        for module, name in triton_entry_points():
            monkeypatch.setattr(module, name, on_gpu(getattr(module, name)))
    yield
