"""``keep_freed_memory``: glibc keeps freed blocks, so a step that frees and reallocates large tensors stops faulting
them back in (counted by the process's minor page faults, in a child process: the setting is process-wide)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.training import allocator
from zoo.training.allocator import keep_freed_memory
from zoo.training.recipe import RecipeError, load_recipe

TINY = Path(__file__).resolve().parents[2] / "configs" / "transformer" / "tiny.yaml"
CHILD = r"""
import importlib.util, json, resource, sys
import torch
# the module alone, without importing zoo's models
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
keep_freed_memory, allocator_settings = allocator.keep_freed_memory, allocator.allocator_settings
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest default mmap threshold (32 MiB)
def step():  # as a forward pass: temporaries of that size made and freed
    for _ in range(4):
        y = x * 2
        z = y + 1
        del y, z
step()  # the first steps fault their memory in either way, while the heap grows to the steps' peak
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "applied": applied, "settings": allocator_settings()}))
"""


def _child(mode):
    out = subprocess.run([sys.executable, "-c", CHILD, mode, allocator.__file__], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_back_in():
    default, kept = _child("default"), _child("keep")
    if kept["applied"] is None:
        pytest.skip("this C library has no mallopt")
    assert default["settings"] is None
    assert kept["settings"] == kept["applied"] == {"mmap_threshold": 2**30, "trim_threshold": 2**31 - 1}
    # 4 steps of 8 x 64 MiB in 4 KiB pages: 524288 faults with glibc's defaults; kept, the steps reuse the heap
    # (at most one block may still be faulted in, where the heap's layout makes it grow once more: 16384)
    assert default["faults"] > 250000, default
    assert kept["faults"] < default["faults"] / 20, (kept, default)


@pytest.mark.parametrize("bad", [0, -5, 2**31, 1.5, True])
def test_thresholds_are_checked(bad):
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=bad)


def test_recipe_option_is_a_boolean():
    recipe = load_recipe(TINY, ["training.keep_freed_memory=true"])
    assert recipe.training.keep_freed_memory is True
    with pytest.raises(RecipeError, match="keep_freed_memory"):
        load_recipe(TINY, ["training.keep_freed_memory=often"])


def test_bench_flag_sets_the_suite_option():
    from bench.__main__ import build_suite_parser, suite_config_from_args

    parser = build_suite_parser()
    assert suite_config_from_args(parser.parse_args(["--keep-freed-memory"])).keep_freed_memory is True
    assert suite_config_from_args(parser.parse_args([])).keep_freed_memory is False
