"""Markdown tables of a suite result (:mod:`bench.suite`): the summary per entry, training and prefill tokens/s per
length, and where a training step's time goes."""

from __future__ import annotations


def _f(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _load(machine: dict, key: str) -> str:
    return f"{machine[key][0]:.1f}" if machine.get(key) else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _largest(rows: list[dict], key: str | None = None) -> dict | None:
    rows = [r for r in rows if r.get("batch", 1) == 1 and (key is None or key in r)]
    return max(rows, key=lambda r: r["seq_len"]) if rows else None


def summary_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, e in result["entries"].items():
        if "error" in e:
            rows.append([name, e.get("model_type", "-"), "error: " + e["error"][:80], *["-"] * 9])
            continue
        ref = e.get("reference") or {}
        check = ref.get("logits_check")
        check_cell = "-" if not ref else ("n/a (baseline)" if not check else
            f"{'ok' if check['passed'] else 'FAIL'} {check['relative_error']:.0e}")  # fmt: skip
        train = e.get("train") or []
        last = _largest(train)
        paired = _largest(train, "reference_over_zoo_median")
        fits = e.get("fits") or {}
        decode = (e.get("decode") or {}).get("zoo") or []
        decode_cell = " → ".join(f"{d['ms_per_token_median']:.1f}" for d in decode) if decode else "-"
        rows.append([
            name,
            ref.get("class", "-"),
            check_cell,
            f"{e['params'] / 1e6:.2f}M",
            "-" if not last else f"{last['seq_len']}: {last['zoo_tokens_per_s']:.0f}",
            "-" if not paired else f"{paired['reference_over_zoo_median']:.2f}x @ {paired['seq_len']}",
            "-" if not last else f"{100 * last['mfu']:.1f}%",
            _f(fits.get("train_time_exponent"), ".2f"),
            _f(fits.get("peak_memory_exponent"), ".2f"),
            _f(fits.get("saved_for_backward_exponent"), ".2f"),
            decode_cell,
            _f(fits.get("decode_time_exponent"), ".2f"),
        ])  # fmt: skip
    return rows


def format_markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    peak = result["peak_matmul"]
    out = [
        f"Machine: {m.get('gpu') or m.get('cpu_model')}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{m['torch_threads']} threads, load average {_load(m, 'loadavg_start')} → {_load(m, 'loadavg_end')}; "
        f"{result['device']} ({result['path']})"
        + ("; glibc keeps freed memory (--keep-freed-memory)." if m.get("allocator_mallopt") else "."),
        f"Models: hidden {cfg['hidden_size']}, {cfg['layers']} layers; {cfg['repeats']} interleaved repeats. "
        f"Matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['method']}).",
        f"Command: `{result['command']}`",
        "",
    ]
    if result.get("complete") is False:
        out[-1:-1] = [f"Incomplete: the run is in progress or was stopped after {len(result['entries'])} entries."]
    header = ["entry", "reference", "logits", "params", "train tok/s (T)", "ref/zoo", "MFU",
              "time exp", "peak mem exp", "saved exp", "decode ms/token", "decode exp"]  # fmt: skip
    out += _table(header, summary_rows(result))
    lengths = sorted(
        {(r["batch"], r["seq_len"]) for e in result["entries"].values() for r in e.get("train", [])}
    )
    if lengths:
        out += ["", "Training step tokens/s (zoo; reference / zoo time ratio in brackets):", ""]
        rows = []
        for name, e in result["entries"].items():
            by = {(r["batch"], r["seq_len"]): r for r in e.get("train", [])}
            cells = []
            for key in lengths:
                r = by.get(key)
                if r is None:
                    cells.append("-")
                else:
                    ratio = r.get("reference_over_zoo_median")
                    cells.append(f"{r['zoo_tokens_per_s']:.0f}" + (f" ({ratio:.2f}x)" if ratio else ""))
            rows.append([name, *cells])
        out += _table(["entry", *(f"B={b} T={t}" for b, t in lengths)], rows)
    prefill = sorted({r["seq_len"] for e in result["entries"].values() for r in e.get("prefill", [])})
    if prefill:
        out += ["", "Prefill tokens/s (zoo; reference / zoo time ratio in brackets):", ""]
        rows = []
        for name, e in result["entries"].items():
            by = {r["seq_len"]: r for r in e.get("prefill", [])}
            cells = [
                "-"
                if t not in by
                else f"{by[t]['zoo_tokens_per_s']:.0f}"
                + (
                    f" ({by[t]['reference_over_zoo_median']:.2f}x)"
                    if "reference_over_zoo_median" in by[t]
                    else ""
                )
                for t in prefill
            ]
            rows.append([name, *cells])
        out += _table(["entry", *(f"T={t}" for t in prefill)], rows)
    profiled = [(n, e["profile"]) for n, e in result["entries"].items() if e.get("profile")]
    if profiled:
        out += ["", f"Where a training step's time goes (T={profiled[0][1]['seq_len']}, self CPU time):", ""]
        rows = [
            [n, *(f"{100 * p['share'][k]:.0f}%" for k in ("gemm", "mixing", "rest"))] for n, p in profiled
        ]
        out += _table(["entry", "GEMMs", "sequence mixing", "rest"], rows)
    if result.get("pending"):
        out += ["", "Pending entries: " + "; ".join(f"{k} ({v})" for k, v in result["pending"].items())]
    third = result.get("third_party") or {}
    if third:
        out += ["", "Third-party kernels: " + "; ".join(f"{k}: {v}" for k, v in third.items())]
    return "\n".join(out)


__all__ = ["format_markdown", "summary_rows"]
