"""bench.generate: per-token decoding cost through generate(), at tiny sizes (what it times, not how fast)."""

from __future__ import annotations

import pytest
import torch

from bench import generate
from bench.registry import load_entries


def test_times_every_new_token_after_a_cached_prefill():
    """One generate() call: the prompt goes through the model once, then one token per forward (the cache is
    used), and the clock has one stamp per new token, so the gaps are the decoding steps only."""
    torch.manual_seed(0)
    model = load_entries()["rwkv7"].make(64, 2, 64).eval()
    lengths = []
    original = model.forward

    def counting_forward(*args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    model.forward = counting_forward
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    timed = generate.time_generate(model, ids, 5)
    assert lengths == [20, 1, 1, 1, 1]
    assert len(timed["step_s"]) == 4 and all(s > 0 for s in timed["step_s"]) and timed["prefill_s"] > 0


def test_run_and_table():
    results = generate.run(["rwkv4"], [8, 24], new_tokens=3, hidden_size=64, layers=1)
    rows = results["rwkv4"]["per_context"]
    assert [row["context"] for row in rows] == [8, 24] and all(len(row["ms_per_token"]) == 2 for row in rows)
    ratio = rows[1]["ms_per_token_median"] / rows[0]["ms_per_token_median"]
    assert results["rwkv4"]["ratio_longest_over_shortest"] == pytest.approx(ratio)
    assert generate.table(results, [8, 24]).splitlines()[2].startswith("| rwkv4 | ")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"entries": ["nope"]}, "unknown entries"),
        ({"entries": ["longformer_mlm"]}, "not causal"),
        ({"contexts": [24, 8]}, "increasing"),
        ({"new_tokens": 2}, "at least 3"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {
        "entries": ["rwkv4"],
        "contexts": [8, 24],
        "new_tokens": 3,
        "hidden_size": 64,
        "layers": 1,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        generate.run(**args)


def test_runs_the_entrys_preparation_first():
    """Hyena's entry distils its filters before decoding; generate() then decodes with the recurrences."""
    results = generate.run(["hyena"], [40, 48], new_tokens=3, hidden_size=64, layers=1)
    assert results["hyena"]["prepared"]["distilled_state"] == 16
