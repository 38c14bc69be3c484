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


def test_reference_chunk_size_is_recorded(tmp_path):
    """transformers' Mamba-2 runs on zoo's chunk length by default, or on the one asked for."""
    from zoo.ops.retention import default_chunk_size

    for chunk, expected in (("zoo", default_chunk_size("torch", 16, 64)), ("48", 48)):
        out = tmp_path / f"{chunk}.json"
        argv = ["--quick", "--arch", "mamba2", "--reference-chunk-size", chunk, "--out", str(out)]
        assert main(argv) == 0
        assert json.loads(out.read_text())["reference_chunk_size"] == expected
    with pytest.raises(SystemExit, match="reference-chunk-size"):
        main(["--quick", "--arch", "mamba2", "--reference-chunk-size", "big"])
