"""Keep freed memory in the process on CPU (glibc): long sequences otherwise pay for page faults on every step.

glibc's ``malloc`` serves every block above its mmap threshold (dynamic, at most 32 MiB) from a fresh ``mmap`` and
returns it to the OS when it is freed, and it trims the top of its heap above the trim threshold. A training step
at long T allocates and frees hundreds of such tensors (a (65536, 256) float32 activation is 64 MiB), so every
step faults all of them back in, page by page, and the kernel zeroes each page first. In a virtual machine a
fault costs more still: here a Hyena step at T = 65536 took 6.6M minor faults (26 GiB faulted in) and 54 s of CPU;
with freed memory kept, 0.1-0.2M faults and 34 s. The cost grows faster than the sequence: at 16K more of the
tensors stay under the threshold.

``keep_freed_memory()`` raises both thresholds with ``mallopt``, so that freed blocks stay in the heap and the next
step reuses them: the resident set stays at the step's peak instead of falling between steps. It is what the
environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do, applied at run time. Opt in with
``training.keep_freed_memory: true`` in a recipe or ``python -m bench --keep-freed-memory``. On another C library
it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
INT_MAX = 2**31 - 1
DEFAULT_MMAP_THRESHOLD = 2**30  # blocks up to 1 GiB from the heap
DEFAULT_TRIM_THRESHOLD = INT_MAX  # the heap's free top kept up to ~2 GiB

_applied: dict | None = None


def libc_function(name: str):
    """The C library's function ``name`` (``mallopt``, ``malloc_trim``) or None (another C library, or none)."""
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name, None) if lib else None
    except OSError:
        return None


def keep_freed_memory(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> dict | None:
    """Raise glibc's mmap and trim thresholds (bytes) for this process. Returns the settings applied, or None where
    the C library has no ``mallopt`` (they are then left alone). Affects allocations made after the call."""
    global _applied
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT_MAX:
            raise ValueError(f"{name} must be an int of bytes in 1 .. {INT_MAX}, got {value!r}")
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return None
    # mallopt returns 1 on success, 0 when glibc refuses the value
    if not mallopt(M_MMAP_THRESHOLD, mmap_threshold) or not mallopt(M_TRIM_THRESHOLD, trim_threshold):
        raise ValueError(
            f"glibc refused mmap_threshold={mmap_threshold} or trim_threshold={trim_threshold} (mallopt returned 0)"
        )
    _applied = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    return dict(_applied)


def allocator_settings() -> dict | None:
    """What ``keep_freed_memory`` applied in this process (None: glibc's defaults)."""
    return dict(_applied) if _applied else None
