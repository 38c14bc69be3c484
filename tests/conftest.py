"""Test-wide setup: offline Hugging Face libraries, the Triton CPU interpreter, deterministic seeds.

The environment variables must be set before ``triton`` or ``transformers`` are first imported, which is why they
live at the top of the root conftest.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# With any of these importable, transformers' own Mamba / linear-attention classes switch to their GPU kernels
# without a device check, and the CPU parity tests would crash or compare against nothing.
_GPU_KERNEL_PACKAGES = [
    name for name in ("fla", "mamba_ssm", "causal_conv1d") if importlib.util.find_spec(name)
]
if _GPU_KERNEL_PACKAGES:
    raise pytest.UsageError(
        f"uninstall {', '.join(_GPU_KERNEL_PACKAGES)} from the test environment: transformers would route its "
        "reference models to their CUDA kernels"
    )

# Without a GPU, Triton kernels are verified under the interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist, each worker gets its share of the cores for torch's intra-op threads: by default every worker
# would start one thread per core, and n workers x n threads on n cores spend their time waiting on each other
# (a tiny recipe's 40 training steps took 4x as long). An explicit OMP_NUM_THREADS is left as it is.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
