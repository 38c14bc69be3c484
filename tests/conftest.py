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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
