"""``python -m bench.infini --memory-lengths ...``: the memory probe of each mode runs, and a run writes its JSON and
table with the target's verdict. Tiny sizes; the children run in this process (no numbers asserted beyond their
being measured: benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bench import infini

TINY = {"segment_length": 16, "update": "delta", "hidden_size": 32, "layers": 1}


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The probe sets this process's torch threads (its own, in a real run): restore them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", infini.MEMORY_MODES)
def test_memory_probe_measures_one_forward(mode):
    record = infini.memory_child({"mode": mode, "length": 40, "threads": 1, "seed": 0, "model": TINY})
    assert record["mode"] == mode and record["seq_len"] == 40
    assert record["peak_bytes"] >= 0 and record["baseline_rss_bytes"] > 0
    if mode == "forward":
        assert record["logits_bytes"] == 40 * 259 * 4
    if mode == "prefill":
        assert record["logits_bytes"] == 259 * 4
        # one layer, one head of 32: the memory (32 x 33), and 8 tokens of keys, memory keys and values, and
        # their real-token mask
        assert record["cache_bytes"] == 32 * 33 * 4 + 3 * 8 * 32 * 4 + 8


def test_memory_run_writes_result_and_table(tmp_path, monkeypatch, capsys):
    run = subprocess.run

    def in_process(cmd, **kwargs):
        if "--probe" not in cmd:  # the machine's description (git)
            return run(cmd, **kwargs)
        spec = json.loads(cmd[cmd.index("--probe") + 1])
        assert kwargs["env"]["MALLOC_MMAP_THRESHOLD_"] == str(infini.MMAP_THRESHOLD)
        return subprocess.CompletedProcess(cmd, 0, json.dumps(infini.memory_child(spec)) + "\n", "")

    monkeypatch.setattr(infini.subprocess, "run", in_process)
    argv = ["--memory-lengths", "24", "40", "--memory-modes", "prefill", "forward", "--segment-length", "16"]
    argv += ["--hidden-size", "32", "--layers", "1", "--out-dir", str(tmp_path)]
    assert infini.main(argv) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["lengths"] == [24, 40] and set(result["summary"]) == {"prefill", "forward"}
    assert [r["seq_len"] for r in result["runs"]["prefill"]] == [24, 40]
    target = result["target"]
    assert target["mode"] == "prefill" and target["lengths"] == [24, 40] and target["max_ratio"] == 1.2
    assert target["met"] == (target["ratio"] <= 1.2)
    table = (tmp_path / "table.md").read_text()
    assert "| prefill |" in table and "longest/shortest" in table
    assert "| forward |" in capsys.readouterr().out
