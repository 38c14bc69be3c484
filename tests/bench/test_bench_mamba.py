"""``python -m bench.mamba --quick`` runs end to end: same weights checked, both models timed, JSON written."""

import json

import pytest

from bench.mamba import main


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "bamba"])
def test_quick_run_writes_the_comparison(arch, tmp_path, capsys):
    out = tmp_path / "mamba.json"
    assert main(["--quick", "--arch", arch, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["logits_relative_error"] < 1e-4
    rows = result["training"]
    assert [r["seq_len"] for r in rows] == [64, 128]
    assert all(len(r["speedup_paired"]) == 2 and r["speedup_median"] > 0 for r in rows)
    assert [d["context"] for d in result["decoding"]] == [32, 128]
    assert "ratio" in capsys.readouterr().out
