"""Smoke test of the benchmark harness at tiny sizes: schema of the JSON and the printed table, no timings asserted."""

from __future__ import annotations

import json

import pytest
import torch

from bench import __main__ as cli
from bench import memprobe
from bench.harness import (
    BenchConfig,
    evaluate_targets,
    format_report,
    linear_fit,
    model_settings,
    packed_position_ids,
)

TINY = [
    "retnet",
    "--quick",
    "--lengths", "32", "64",
    "--decode-contexts", "16", "48",
    "--repeats", "2",
    "--decode-steps", "2",
    "--memory", "off",
    "--threads", "1",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    assert cli.main([*TINY, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_schema(run):
    assert run["schema_version"] == 1
    assert run["command"].startswith("python -m bench retnet --quick")
    for key in ("cpu_count", "torch", "torch_threads", "platform", "python"):
        assert key in run["machine"]
    assert run["machine"]["torch_threads"] == 1
    assert isinstance(run["machine"]["allocator_env"], dict)
    assert set(run["models"]) == {"retnet", "transformer"}
    assert all(m["params"] > 0 for m in run["models"].values())

    train = run["training"]
    assert [r["seq_len"] for r in train["results"]] == [32, 64]
    for row in train["results"]:
        assert len(row["speedup_paired"]) == 2
        for name in ("retnet", "transformer"):
            assert len(row[name]["step_s"]) == 2
            assert row[name]["tokens_per_s_median"] > 0
            faults = row[name]["minor_faults"]
            assert len(faults) == 2 and all(isinstance(f, int) and f >= 0 for f in faults)
    assert train["memory_method"] is None and train["memory_fit"] is None

    dec = run["decoding"]
    assert dec["contexts"] == [16, 48]
    for entry in dec["models"].values():
        assert [c["context"] for c in entry["per_context"]] == [16, 48]
        assert entry["per_context"][1]["final_context"] == 48 + 1 + 2 * 2  # decode_warmup 1, 2 blocks of 2
        assert len(entry["ratio_48_over_16_paired"]) == 2
        assert entry["ratio_long_over_short_median"] > 0

    assert set(run["targets"]) == {"train_speedup", "retnet_memory_linear", "decode_ratio"}
    assert run["targets"]["train_speedup"]["met"] is None  # T=8192 not measured


def test_table(run, capsys):
    text = format_report(run)
    assert "Training step" in text and "Decoding" in text and "Targets:" in text
    assert "RetNet/TF" in text and "48/16" in text


def test_memory_probe_records(capsys):
    cfg = BenchConfig(lengths=[16, 32], hidden_size=32, layers=1, heads=2, chunk_size=16, threads=1)
    spec = {
        "threads": 1,
        "seed": 0,
        "vocab_size": cfg.vocab_size,
        "models": {name: model_settings(cfg, name) for name in ("retnet", "transformer")},
        "runs": [["retnet", 16], ["retnet", 32], ["transformer", 16]],
    }
    memprobe.main([json.dumps(spec)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["seq_len"]) for r in records] == [
        ("retnet", 16),
        ("retnet", 32),
        ("transformer", 16),
    ]
    for r in records:
        assert r["peak_bytes"] >= 0 and r["saved_for_backward_bytes"] > 0
    # activations saved for backward double with the length (no constant term: parameters are excluded)
    assert records[1]["saved_for_backward_bytes"] > records[0]["saved_for_backward_bytes"]


def test_linear_fit_and_targets():
    fit = linear_fit([1, 2, 4, 8], [3, 5, 9, 17])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0)
    quad = linear_fit([1, 2, 4, 8], [1, 4, 16, 64])
    assert quad["growth_exponents"][-1] == pytest.approx(2.0)
    result = {
        "training": {
            "results": [{"seq_len": 8192, "speedup_median": 3.5}],
            "memory_fit": {"retnet": {**fit, "linear": True}},
        },
        "decoding": {"contexts": [1024, 16384], "models": {"retnet": {"ratio_long_over_short_median": 1.5}}},
    }
    targets = evaluate_targets(result)
    assert targets["train_speedup"]["met"] is True
    assert targets["decode_ratio"]["met"] is False


def test_bad_config():
    with pytest.raises(ValueError, match="memory"):
        BenchConfig(memory="sometimes")
    with pytest.raises(ValueError, match="lengths"):
        BenchConfig(lengths=[1])


def test_retnet_ffn_matched_by_default_equal_on_request():
    """By default RetNet's FFN is narrowed until the parameter counts agree (same width and depth);
    --retnet-ffn equal gives both the transformer's feed-forward width."""
    from bench.__main__ import build_parser, config_from_args
    from bench.harness import build_model, num_params

    parse = lambda *extra: config_from_args(
        build_parser().parse_args(["--hidden-size", "64", "--layers", "2", *extra])
    )
    cfg = parse()
    assert cfg.retnet_ffn == "matched"
    settings = {name: model_settings(cfg, name) for name in ("retnet", "transformer")}
    assert settings["transformer"]["intermediate_size"] == 128
    assert settings["retnet"]["intermediate_size"] < 128
    params = {name: num_params(build_model(name, s)) for name, s in settings.items()}
    assert abs(params["retnet"] - params["transformer"]) / params["transformer"] < 0.01

    equal = parse("--retnet-ffn", "equal")
    assert equal.retnet_ffn == "equal"
    assert model_settings(equal, "retnet")["intermediate_size"] == 128
    with pytest.raises(ValueError, match="retnet_ffn"):
        BenchConfig(retnet_ffn="wide")


def _one_length_training_only(**overrides) -> BenchConfig:
    """A one-layer pair timed once at T = 16: training only, no memory probe, no decoding."""
    settings = dict(lengths=[16], hidden_size=32, layers=1, heads=2, chunk_size=8, repeats=1)
    settings.update(memory="off", skip_decode=True, threads=1, progress=False)
    return BenchConfig(**{**settings, **overrides})


def test_models_are_built_with_their_settings(monkeypatch):
    """The timed models get the RetNet-only settings too (chunk size, matched feed-forward)."""
    import bench.harness as harness

    built = {}
    real_build = harness.build_model

    def spy(name, kwargs, seed=0):
        built[name] = real_build(name, kwargs, seed)
        return built[name]

    monkeypatch.setattr(harness, "build_model", spy)
    cfg = _one_length_training_only(warmup=0, retnet_ffn="matched")
    harness.run_benchmark(cfg, ["--quick"])
    assert built["retnet"].config.chunk_size == 8
    assert built["retnet"].config.intermediate_size == harness.matched_retnet_intermediate(cfg)


def test_compile_wraps_the_timed_models(monkeypatch):
    """--compile times torch.compile'd models (here the quick ``eager`` backend) and needs a warm-up step."""
    import bench.harness as harness

    compiled = []
    real_compile = torch.compile

    def spy(model):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(harness.torch, "compile", spy)
    cfg = _one_length_training_only(compile=True)
    result = harness.run_benchmark(cfg, ["--compile"])
    assert sorted(compiled) == ["RetNetForCausalLM", "TransformerForCausalLM"]
    assert result["config"]["compile"] and "torch.compile" in harness.format_report(result)
    with pytest.raises(ValueError, match="warmup"):
        BenchConfig(compile=True, warmup=0)


def test_packed_workload(run):
    """--quick also trains each length as 4 packed documents, timed in the same repeats as the unpacked steps."""
    for row in run["training"]["results"]:
        packed = row["packed"]
        assert packed["documents"] == 4
        for name in ("retnet", "transformer"):
            assert len(packed[name]["step_s"]) == 2 and packed[name]["tokens_per_s_median"] > 0
            assert len(packed["packed_over_unpacked_paired"][name]) == 2
            assert packed["packed_over_unpacked_median"][name] > 0
        assert len(packed["speedup_paired"]) == 2
    assert "RetNet packed/unpacked" in format_report(run)


def test_packed_position_ids_restart_per_document():
    from zoo.modules.documents import cu_seqlens_from_position_ids

    pos = packed_position_ids(10, 3)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 6, 10]
    assert packed_position_ids(2048, 32).shape == (1, 2048)


def test_packed_workload_is_optional_and_capped_by_the_length():
    """--packed-documents 0 turns the workload off; a length shorter than the count gets one token a document."""
    import bench.harness as harness

    off = harness.run_benchmark(_one_length_training_only(packed_documents=0), [])
    assert "packed" not in off["training"]["results"][0]
    assert "packed" not in format_report(off)
    capped = harness.run_benchmark(_one_length_training_only(packed_documents=32, warmup=0), [])
    assert capped["training"]["results"][0]["packed"]["documents"] == 16
    with pytest.raises(ValueError, match="packed_documents"):
        BenchConfig(packed_documents=1)
