"""RWKV-4 against transformers' ``RwkvForCausalLM`` holding the same weights (``convert_rwkv``); RWKV-6 and -7,
which transformers does not have, against the baseline transformer of the same width and depth; and all three
against BlinkDL's official ``rwkv`` package (0.8.x) on the same weights (``to_blink``), prefill and decoding.
Peng et al. 2023, arXiv:2305.13048; 2024, arXiv:2404.05892; 2025, arXiv:2503.14456.

The package is an inference runtime: its forward runs under ``torch.no_grad`` (RWKV-7's in TorchScript), so there is
no training step to compare with, and its entries time prefill and decoding only. It loads a ``.pth`` file, holds
its weights outside ``nn.Module`` parameters, and picks its RWKV-7 class only when ``RWKV_V7_ON=1`` is set when it
is imported: :class:`PackageRwkv` adapts it to the causal-LM interface the suite drives (``input_ids`` in,
``logits`` and a cache out), loading the package's module once per flavour under the environment it needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
from pathlib import Path

import torch

from bench.registry import BASELINE, Entry, Reference

PACKAGE_STRATEGY = "cpu fp32"
_PACKAGE_MODULES: dict[bool, object] = {}


def _to_transformers(model):
    from zoo.models.rwkv.convert_rwkv import to_transformers

    return to_transformers(model)


def package_module(v7: bool):
    """``rwkv/model.py`` of the installed package, executed as its own module: with ``RWKV_V7_ON=1`` for RWKV-7
    (where ``RWKV`` is the RWKV-7 class), without it for RWKV-4 and -6; TorchScript on (the package's default),
    its CUDA kernels off."""
    if v7 in _PACKAGE_MODULES:
        return _PACKAGE_MODULES[v7]
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the rwkv package is not installed (pip install 'rwkv>=0.8'; the test extra has it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    # both read again when a model loads and runs (as the package's own import leaves them set)
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ["RWKV_JIT_ON"] = "1"
    saved = os.environ.get("RWKV_V7_ON")
    if v7:
        os.environ["RWKV_V7_ON"] = "1"
    else:
        os.environ.pop("RWKV_V7_ON", None)
    try:
        module_spec = importlib.util.spec_from_file_location(
            f"_bench_rwkv_package_{'v7' if v7 else 'v4_v6'}", path
        )
        module = importlib.util.module_from_spec(module_spec)
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would interleave with the suite's output
            module_spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("RWKV_V7_ON", None)
        else:
            os.environ["RWKV_V7_ON"] = saved
    _PACKAGE_MODULES[v7] = module
    return module


class PackageRwkv(torch.nn.Module):
    """The ``rwkv`` package (``strategy="cpu fp32"``) running a zoo RWKV's weights, behind the causal-LM interface:
    ``forward(input_ids, cache=...)`` returns the logits of every token and the package's recurrent state as the
    cache (its sequence mode for a prompt, its RNN mode for one token). The converted weights are also held as
    frozen parameters, so that the suite counts the same parameters; the package itself runs on its own copy."""

    # the suite decodes a reference token by token when it offers the zoo cache interface
    decodes_with_cache = True

    def __init__(self, zoo_model: torch.nn.Module):
        super().__init__()
        from zoo.models.rwkv.convert_rwkv import to_blink

        self.config = zoo_model.config
        self.version = zoo_model.config.version
        weights = to_blink(zoo_model)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(value.detach().clone(), requires_grad=False) for value in weights.values()
        )
        module = package_module(self.version == 7)
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
            path = os.path.join(folder, "model.pth")
            torch.save(weights, path)
            if self.version == 7:
                package = module.RWKV(path[: -len(".pth")], PACKAGE_STRATEGY)
            else:
                package = module.RWKV(path, PACKAGE_STRATEGY, verbose=False)
        object.__setattr__(self, "package", package)  # not a submodule: .to() and .train() leave it alone

    def forward(self, input_ids: torch.Tensor, labels=None, use_cache=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from zoo.models.utils import _CACHE_ALIASES, CACHE_NAME, with_cache

        if labels is not None:
            raise ValueError(
                "the rwkv package has no backward (its forward runs under torch.no_grad): no loss"
            )
        if input_ids.device.type != "cpu":
            raise ValueError(
                f"the rwkv package reference runs on the CPU here, got input on {input_ids.device}"
            )
        state = next((kwargs.pop(name) for name in (CACHE_NAME, *_CACHE_ALIASES) if name in kwargs), None)
        if state is not None and input_ids.shape[0] != 1:
            raise ValueError(
                f"the rwkv package carries one sequence's state: batch 1 with a cache, got {input_ids.shape[0]}"
            )
        rows = []
        for row in input_ids.tolist():
            logits, state_out = self.package.forward(row, state, full_output=True)
            rows.append(logits.reshape(len(row), -1))
        return with_cache(CausalLMOutputWithPast, state_out, logits=torch.stack(rows))


PACKAGE_NOTES = (
    "Reference: BlinkDL's rwkv package (0.8.x, strategy 'cpu fp32', TorchScript on, its CUDA kernels off) on the "
    "same weights (zoo -> BlinkDL .pth via to_blink); logits checked before timing. Prefill: the package's sequence "
    "mode over the whole prompt; decode: its RNN mode, one token per call. No training comparison: the package has "
    "no backward (its forward runs under torch.no_grad)."
)


def _package_entry(version: int, family: str) -> Entry:
    return Entry(
        name=f"rwkv{version}_package",
        model_type="zoo_rwkv",
        family=family,
        config={"version": version},
        reference=Reference("rwkv package 0.8.x, cpu fp32 (same weights)", PackageRwkv, True),
        workloads=("prefill", "decode"),
        mixers=("RwkvTimeMix",),
        lengths=(512, 1024, 2048),
        notes=PACKAGE_NOTES,
    )


ENTRIES = [
    Entry(
        name="rwkv4",
        model_type="zoo_rwkv",
        family="wkv4",
        config={"version": 4},
        reference=Reference("transformers RwkvForCausalLM (same weights)", _to_transformers, True, max_length=2048),
        mixers=("RwkvTimeMix",),
    ),
    Entry(name="rwkv6", model_type="zoo_rwkv", family="rwkv6", config={"version": 6}, reference=BASELINE,
          mixers=("RwkvTimeMix",)),
    Entry(name="rwkv7", model_type="zoo_rwkv", family="rwkv7", config={"version": 7}, reference=BASELINE,
          mixers=("RwkvTimeMix",)),
    _package_entry(4, "wkv4"),
    _package_entry(6, "rwkv6"),
    _package_entry(7, "rwkv7"),
]  # fmt: skip
