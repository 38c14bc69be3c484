"""Kernels of zoo, one folder per family: ``naive.py`` (the oracle), ``chunk.py`` (PyTorch), ``triton.py``."""

from zoo.ops.dispatch import BACKENDS, resolve_backend, triton_available

__all__ = ["BACKENDS", "resolve_backend", "triton_available"]
