"""Backend selection shared by every op family in ``zoo.ops``.

Every op exists in up to three forms (see ``ARCHITECTURE``: ``naive`` / ``torch`` / ``triton``). The form used
for a call is chosen, in this order, by the ``backend=`` argument, the ``ZOO_BACKEND`` environment variable, and
the device of the inputs (CUDA -> ``triton``, anything else -> ``torch``). The choice is logged once per op.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

BACKENDS = ("naive", "torch", "triton")
logger = logging.getLogger("zoo.ops")
_logged: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports and can run here (a CUDA device, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(
    op: str,
    backend: str | None,
    device: torch.device | None = None,
    *,
    extra: tuple[str, ...] = (),
    cuda_default: str = "triton",
) -> str:
    """Return the backend name to use for ``op``.

    ``backend`` wins; then ``ZOO_BACKEND``; then the device (CUDA -> ``cuda_default``). Unknown names raise
    ``ValueError`` naming the accepted ones (``BACKENDS`` and the op's own ``extra`` ones, e.g. sparse
    attention's ``flex``). Asking for ``triton`` where it cannot run raises ``RuntimeError`` saying why.
    """
    source = "argument"
    if backend is None:
        backend = os.environ.get("ZOO_BACKEND") or None
        source = "ZOO_BACKEND"
    if backend is None:
        source = "device"
        on_cuda = device is not None and torch.device(device).type == "cuda"
        usable = cuda_default != "triton" or triton_available()
        backend = cuda_default if on_cuda and usable else "torch"
    backend = backend.lower()
    if backend not in BACKENDS + extra:
        raise ValueError(f"{op}: backend={backend!r} (from {source}) is not one of {BACKENDS + extra}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            f"{op}: backend='triton' needs triton and a CUDA device, or TRITON_INTERPRET=1 set before triton "
            "is imported to run the kernels on the CPU"
        )
    key = (op, backend)
    if key not in _logged and not torch.compiler.is_compiling():  # logging would break a compiled graph
        _logged.add(key)
        logger.info("zoo.ops.%s: using the %s backend (chosen by %s)", op, backend, source)
    return backend
