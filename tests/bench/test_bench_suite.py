"""The all-architecture suite (``python -m bench``): entry coverage of the model registry, FLOP counters against hand
counts, the quick path end to end on one tiny entry, and the GPU-branch selection. No timing is asserted."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import zoo  # noqa: F401  (registers the architectures)
from bench import flops
from bench.registry import PENDING, Entry, coverage, load_entries
from zoo.models.registry import REGISTRY


def test_every_registered_model_type_has_an_entry():
    """A new architecture fails here until it declares an entry in bench/entries/ (or, while one is being
    written, a line in PENDING); a pending line whose entry has landed fails too."""
    entries = load_entries()
    gaps = coverage(entries)
    assert gaps["missing"] == [], f"registered model types without a bench entry: {gaps['missing']}"
    assert gaps["stale"] == [], (
        f"remove these from bench.registry.PENDING, their entries exist: {gaps['stale']}"
    )
    assert set(PENDING) <= set(REGISTRY)
    for entry in entries.values():
        assert entry.model_type in REGISTRY and entry.family in flops.FAMILIES
        assert entry.mixers, f"{entry.name}: no sequence-mixing modules named for the profile"


def test_bad_entries_are_refused():
    with pytest.raises(ValueError, match="workloads"):
        Entry(name="x", model_type="zoo_transformer", family="attention", workloads=("train", "fly"))
    with pytest.raises(ValueError, match="decode"):
        Entry(name="x", model_type="zoo_transformer", family="attention", objective="masked_lm")
    with pytest.raises(ValueError, match="family"):
        flops.forward_flops(torch.nn.Linear(2, 2), "quantum", 1, 4)


def test_attention_and_dense_flops_by_hand():
    """zoo_transformer at width 32, one layer: one head of 32, SwiGLU 88 wide, vocabulary 259, B = 2, T = 4."""
    from bench.registry import causal_lm

    model = causal_lm("zoo_transformer", 32, 1, 16)
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (1, 88)
    terms = flops.forward_flops(model, "attention", 2, 4)
    # q, k, v, o: 4 * 32 * 32; gate, up, down: 3 * 32 * 88; LM head: 32 * 259; 2 FLOPs each, B * T = 8 tokens
    assert terms["dense"] == 2 * 8 * (4 * 32 * 32 + 3 * 32 * 88 + 32 * 259) == 333312
    # QK^T and PV over 1 + 2 + 3 + 4 = 10 causal pairs, 32 wide, 2 FLOPs per multiply-add, batch 2
    assert terms["attention"] == 2 * 2 * 2 * 32 * 10 == 2560
    assert terms["total"] == 333312 + 2560
    assert flops.training_flops(model, "attention", 2, 4) == 3 * terms["total"]
    # torch's own FLOP counter sees the same products (it does not count CPU SDPA's attention)
    ids = torch.randint(3, 259, (2, 4))
    assert flops.measured_matmul_flops(model, ids) == terms["dense"]


def test_sparse_attention_pairs_by_hand():
    assert flops.window_pairs(5, 2, causal=True) == 1 + 2 + 3 + 3 + 3
    assert flops.window_pairs(5, 4, causal=False) == 3 + 4 + 5 + 4 + 3  # |i - j| <= 2
    # 8 one-token blocks, window 3, one global block each end, one random block: two global query blocks see
    # all 8; blocks 1 and 6 see {window} + {0, 7} = 4 blocks, blocks 2-5 see 5, each plus one random
    assert flops.block_sparse_pairs(8, 1, 3, 1, 1, causal=False) == 2 * 8 + 2 * 5 + 4 * 6
    # causal, blocks of 2, 8 blocks: block 0 (global) 1; block 1 {0, 1}; block 2 {0, 1, 2}, no room for a random
    # one; blocks 3-7 {0, n-1, n} + 1 random = 4 each -> 26 blocks of 4 pairs, less the 1 pair after the query in
    # each of the 8 blocks with themselves
    assert flops.block_sparse_pairs(16, 2, 2, 1, 1, causal=True) == (1 + 2 + 3 + 5 * 4) * 4 - 8
    # never more than dense attention
    assert flops.block_sparse_pairs(8, 2, 2, 1, 1, causal=True) == 8 * 9 // 2


def test_recurrence_family_flops_by_hand():
    # chunks of 2, 2, 1 tokens: intra 2 * (3 + 4) * (4 + 4 + 1); inter 4 * 3 * 4 per token; 2 heads
    assert flops.chunked_linear_attention_flops(1, 5, 2, 3, 4, 2) == 2 * (2 * 7 * 9 + 4 * 3 * 4 * 5)
    mamba = SimpleNamespace(num_hidden_layers=2, expand=2, hidden_size=4, state_size=3, conv_kernel=4)
    # d_inner 8: 7 FLOPs per (token, channel, state), convolution 2 * 4 per (token, channel); B * T = 6
    assert flops.FAMILIES["selective_scan"](mamba, 2, 3) == {
        "selective_scan": 2 * 7 * 6 * 8 * 3,
        "conv": 2 * 2 * 4 * 8 * 6,
    }
    rwkv = SimpleNamespace(num_hidden_layers=1, attention_hidden_size=8, head_size=4)
    assert flops.FAMILIES["wkv4"](rwkv, 1, 5) == {"wkv4": 23 * 5 * 8}
    assert flops.FAMILIES["rwkv6"](rwkv, 1, 5) == {"wkv6": 5 * 2 * (7 * 16 + 4)}
    assert flops.FAMILIES["rwkv7"](rwkv, 1, 5) == {"wkv7": 5 * 2 * 9 * 16}
    reformer = SimpleNamespace(
        num_hidden_layers=2, attn_layers=["local", "lsh"], num_attention_heads=1, attention_head_size=4,
        local_attn_chunk_length=2, local_num_chunks_before=1, local_num_chunks_after=0, lsh_attn_chunk_length=2,
        lsh_num_chunks_before=1, lsh_num_chunks_after=0, num_hashes=2, num_buckets=4,
    )  # fmt: skip
    # T = 3 padded to 4: 4 queries x 2 chunks of 2 keys = 16 pairs; 2 hash rounds; rotations 4 x (4 / 2) per token
    assert flops.FAMILIES["lsh_attention"](reformer, 1, 3) == {
        "local_attention": 4 * 4 * 16,
        "lsh_attention": 2 * 4 * 4 * 16,
        "lsh_hashing": 2 * 2 * 4 * 2 * 4,
    }
    # segments of 3 and 2 tokens: 6 + 3 causal pairs; delta memory 6 D^2 per token and head
    infini = SimpleNamespace(
        num_hidden_layers=1, num_attention_heads=2, head_dim=4, segment_length=3, memory_update="delta"
    )
    assert flops.FAMILIES["infini"](infini, 1, 5) == {
        "segment_attention": 4 * 2 * 4 * 9,
        "compressive_memory": 5 * 2 * 6 * 16,
    }
    # RMT, one memory token, segments of 2 and 1 tokens run as 4 and 3 positions: 10 + 6 causal pairs, and
    # 2 memory positions per segment through the per-token layers
    backbone = SimpleNamespace(num_attention_heads=1, head_dim=4, hidden_size=4, num_hidden_layers=1)
    rmt = SimpleNamespace(backbone=backbone, num_mem_tokens=1, segment_length=2)
    assert flops.FAMILIES["rmt"](rmt, 1, 3) == {"attention": 4 * 4 * 16, flops.EXTRA_TOKENS: 2 * 2}
    hyena = SimpleNamespace(num_hidden_layers=1, hidden_size=2, order=2, short_filter_order=3)
    # T = 4 -> FFT size 8: a real FFT 2.5 * 8 * 3 = 60; per channel and sequence rfft + irfft + 6 * 5 complex
    # products = 150, the filter's rfft 60 once; (order - 1) * 2 = 2 channels; short conv 2 * 3 * (3 * 2) * 4
    assert flops.FAMILIES["long_conv"](hyena, 1, 4) == {"fft_conv": 2 * (150 + 60), "short_conv": 144}


def test_rwkv_low_rank_and_hyena_filter_are_counted():
    from bench.registry import causal_lm

    rwkv7 = causal_lm("zoo_rwkv", 64, 1, 64, version=7)
    lora = [
        p for n, p in rwkv7.named_parameters() if n.split(".")[-1] in ("w1", "w2", "a1", "a2", "g1", "g2")
    ]
    assert flops.linear_flops(rwkv7, 1, 3)["low_rank"] == 2 * 3 * sum(p.numel() for p in lora)
    hyena = causal_lm("zoo_hyena", 32, 1, 64)
    one, two = flops.linear_flops(hyena, 1, 8), flops.linear_flops(hyena, 2, 8)
    assert two["dense"] == 2 * one["dense"] and two["filter_network"] == one["filter_network"] > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench import __main__ as cli

    out = tmp_path_factory.mktemp("suite")
    argv = [
        "--quick", "--entries", "transformer", "--lengths", "16", "32", "--batch-sizes", "1", "2",
        "--decode-contexts", "8", "24", "--decode-steps", "2", "--repeats", "1", "--profile-length", "16",
        "--peak-size", "64", "--memory", "off", "--no-progress", "--out-dir", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return out, json.loads((out / "result.json").read_text())


def test_quick_run_writes_json_table_and_plots(quick):
    out, result = quick
    assert result["command"].startswith("python -m bench --quick --entries transformer")
    assert result["device"] == "cpu" and result["machine"]["torch_threads"] == 1
    assert result["complete"] is True and not list(out.glob(".*.tmp"))
    assert result["peak_matmul"]["flops_per_s"] > 0
    assert "kernel_comparisons" not in result  # the GPU comparisons run on CUDA only
    entry = result["entries"]["transformer"]
    assert entry["reference"]["class"] == "LlamaForCausalLM"
    check = entry["reference"]["logits_check"]
    assert check["passed"] and check["relative_error"] < check["tolerance"]
    assert [(r["batch"], r["seq_len"]) for r in entry["train"]] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    for row in entry["train"]:
        assert row["training_flops"] > 0 and 0 < row["mfu"]
        assert len(row["reference_over_zoo_paired"]) == 1
    assert [r["seq_len"] for r in entry["prefill"]] == [16, 32]
    assert [d["context"] for d in entry["decode"]["zoo"]] == [8, 24]
    assert [d["context"] for d in entry["decode"]["zoo"]] == [8, 24]
    shares = entry["profile"]["share"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["gemm"] > 0 and shares["mixing"] > 0
    assert entry["fits"]["train_time_exponent"] is not None and "peak_memory_exponent" not in entry["fits"]
    assert set(entry["process_memory"]) == {"train", "prefill", "profile", "decode", "after_entry"}
    table = (out / "table.md").read_text()
    assert "| transformer | LlamaForCausalLM | ok" in table
    assert ("Pending entries" in table) == bool(PENDING)
    assert sorted(result["plots"]) == sorted(f"plots/{p}.png" for p in ("train_time", "decode"))
    assert all((out / p).stat().st_size > 0 for p in result["plots"])


def test_a_stopped_run_keeps_the_entries_it_finished():
    """``on_entry`` sees the result after each entry, marked incomplete until the end, with the entry's fits."""
    from bench.report import format_markdown
    from bench.suite import SuiteConfig, run_suite

    cfg = SuiteConfig(
        entries=["transformer", "retnet"], hidden_size=32, layers=1, lengths=[16, 32], decode_contexts=[8],
        decode_steps=1, repeats=1, warmup=0, memory="off", profile_length=None, peak_size=32, plots=False,
    )  # fmt: skip
    seen = []
    result = run_suite(cfg, on_entry=lambda partial: seen.append((json.loads(json.dumps(partial)),
                                                                  format_markdown(partial))))  # fmt: skip
    assert [sorted(r["entries"]) for r, _ in seen] == [["transformer"], ["retnet", "transformer"]]
    assert [r["complete"] for r, _ in seen] == [False, False] and result["complete"] is True
    first, table = seen[0]
    assert first["entries"]["transformer"]["fits"]["train_time_exponent"] is not None
    assert "Incomplete: the run is in progress or was stopped after 1 entries." in table
    assert "Incomplete" not in format_markdown(result)


def test_references_are_timed_up_to_the_cap_only():
    """--reference-max-length: zoo at every length, the reference only up to the cap (scaling runs to 64K)."""
    from bench.flops import peak_matmul_flops
    from bench.suite import SuiteConfig, run_entry

    cfg = SuiteConfig(
        hidden_size=32, layers=1, lengths=[16, 32], repeats=1, warmup=0, memory="off", profile_length=None,
        decode_contexts=[8], decode_steps=1, reference_max_length=16,
    )  # fmt: skip
    result = run_entry(
        load_entries()["transformer"], cfg, "cpu", torch.float32, peak_matmul_flops(size=32, repeats=1),
        lambda _: None,
    )  # fmt: skip
    for rows in (result["train"], result["prefill"]):
        assert [("reference_over_zoo_median" in r) for r in rows] == [True, False]
    with pytest.raises(ValueError, match="reference_max_length"):
        SuiteConfig(reference_max_length=0)


def test_masked_lm_entry_checks_logits_and_trains():
    """An encoder entry: transformers' LongformerForMaskedLM on the same weights agrees, the masked-LM step is timed
    against it, and nothing is decoded."""
    from bench.flops import peak_matmul_flops
    from bench.suite import SuiteConfig, run_entry

    entry = load_entries()["longformer_mlm"]
    cfg = SuiteConfig(
        hidden_size=32, layers=1, lengths=[32], repeats=1, warmup=0, memory="off", profile_length=None
    )
    result = run_entry(
        entry, cfg, "cpu", torch.float32, peak_matmul_flops(size=32, repeats=1), lambda _: None
    )
    assert "error" not in result and result["reference"]["logits_check"]["passed"]
    assert (
        result["train"][0]["reference_over_zoo_median"] > 0 and result["prefill"][0]["zoo_tokens_per_s"] > 0
    )
    assert "decode" not in result and "profile" not in result


def test_memory_probe_of_entries(capsys):
    """The suite's child-process probe (run in this process here): one record per (entry, length), the saved
    bytes growing with the length, for a causal LM and for a masked-LM encoder."""
    from bench import memprobe

    spec = {
        "threads": 1,
        "seed": 0,
        "entries": {"hidden_size": 32, "layers": 1, "max_len": {"transformer": 64, "longformer_mlm": 64}},
        "runs": [["transformer", 16], ["transformer", 32], ["longformer_mlm", 32]],
    }
    memprobe.main([json.dumps(spec)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["model"], r["seq_len"]) for r in records] == [
        ("transformer", 16), ("transformer", 32), ("longformer_mlm", 32),
    ]  # fmt: skip
    assert all(r["peak_bytes"] >= 0 and r["saved_for_backward_bytes"] > 0 for r in records)
    assert records[1]["saved_for_backward_bytes"] > records[0]["saved_for_backward_bytes"]


def test_gpu_branch_only_with_cuda(monkeypatch):
    from bench.gpu import compare_kernels
    from bench.suite import select_device, third_party_status

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == ("cpu", torch.float32)
    assert select_device("cpu") == ("cpu", torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == ("cuda", torch.bfloat16)
    assert select_device("cpu") == ("cpu", torch.float32)
    with pytest.raises(ValueError, match="device"):
        select_device("tpu")
    # libraries that are not installed are skipped with a message, without touching a GPU
    status = third_party_status()
    assert status["fla"].startswith("not installed") and status["mamba_ssm"].startswith("not installed")
    skipped = compare_kernels(status)
    assert all("skipped" in skipped[name] for name in ("fla", "fla_rwkv6", "fla_rwkv7", "mamba_ssm"))


def test_kernel_comparison_measures_both_and_their_difference(monkeypatch):
    """``bench.gpu._compare`` (run here on the CPU, the GPU's synchronisation a no-op): both functions timed on the
    same inputs, forward and backward, and the largest difference of their forward outputs relative to zoo's; a
    library computing something else shows as a large difference, not as a speed."""
    from bench import gpu
    from zoo.ops.retention import retention

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    log_gamma = torch.tensor([-0.1, -0.3], dtype=torch.float64)
    ours = lambda q, k, v: retention(q, k, v, log_gamma, backend="torch")  # noqa: E731
    same = gpu._compare(lambda q, k, v: retention(q, k, v, log_gamma, backend="naive"), ours, (q, k, v), "x", 2)
    assert set(same) == {"zoo_path", "zoo_s", "library_s", "library_over_zoo", "forward_max_rel_diff"}
    assert same["forward_max_rel_diff"] < 1e-12 and same["zoo_s"] > 0 and same["library_s"] > 0
    assert same["library_over_zoo"] == pytest.approx(same["library_s"] / same["zoo_s"])
    assert q.grad is not None and k.grad is not None and v.grad is not None
    other = gpu._compare(lambda q, k, v: retention(q, k, v, log_gamma * 2, backend="naive"), ours, (q, k, v), "x", 2)
    assert other["forward_max_rel_diff"] > 1e-2
