"""``python -m bench.rmt``: runs, writes its JSON, and shows what truncated BPTT keeps for the backward."""

import json

from bench import rmt


def test_quick_run_writes_json_and_truncation_with_an_answer_loss_keeps_less(tmp_path, capsys):
    out = tmp_path / "rmt.json"
    assert rmt.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    saved = {(r["setting"], r["segments"]): r["saved_mb"] for r in result["training"]}
    # every token in the loss: each segment keeps its graph, truncated or not
    assert saved[("full", 4)] > 1.5 * saved[("full", 2)]
    # the loss on the answer at the end: the two segments before the truncation keep nothing
    answer = saved[("bptt_depth=2, answer loss", 4)]
    assert answer < 0.7 * saved[("full", 4)]
    assert answer < 1.3 * saved[("bptt_depth=2, answer loss", 2)]
    assert set(result["decode_ms"]) == {"1", "4"}
