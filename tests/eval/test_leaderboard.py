"""The leaderboard: its tasks are what they say, its scoring can reach both ends, and a toy run writes the table,
the plots and loadable models."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from eval.leaderboard.run import (
    LeaderboardConfig,
    evaluate_passkey,
    evaluate_recall,
    mixture_loss,
    parse_architecture,
    run_leaderboard,
)
from eval.leaderboard.tasks import (
    BYTE_VOCAB,
    IGNORE,
    PASSKEY_DIGITS,
    TaskMaker,
    Vocab,
    text_stream,
    tokenizer_for,
)

VOCAB = Vocab(num_keys=16, num_values=16)


@pytest.fixture
def maker():
    return TaskMaker(VOCAB, text_stream(["some text to fill the haystack with. " * 40], 4096))


def test_vocabulary_layout():
    assert VOCAB.key(0) == BYTE_VOCAB and VOCAB.value(0) == BYTE_VOCAB + 16
    assert (
        VOCAB.passkey_marker == BYTE_VOCAB + 32 and VOCAB.size % 8 == 0 and VOCAB.size > VOCAB.passkey_marker
    )
    tok = tokenizer_for(VOCAB)
    assert len(tok) == VOCAB.size
    assert tok.convert_ids_to_tokens([VOCAB.key(3), VOCAB.value(5), VOCAB.passkey_marker]) == [
        "<k3>",
        "<v5>",
        "<passkey>",
    ]


def test_recall_sample_layout(maker):
    s = maker.recall(random.Random(0), 100, 5, gap=40)
    ids, labels = s.input_ids, s.labels
    assert len(ids) == len(labels) == 100
    pairs = dict(zip(ids[0:10:2], ids[1:10:2]))
    assert all(VOCAB.key(0) <= k < VOCAB.value(0) for k in pairs) and len(pairs) == 5
    queries = ids[50:60]
    assert sorted(queries[0::2]) == sorted(pairs)
    assert [pairs[k] for k in queries[0::2]] == queries[1::2]  # each query is followed by its value
    targets = [(i, t) for i, t in enumerate(labels) if t != IGNORE]
    assert [i for i, _ in targets] == list(range(51, 60, 2)) and [t for _, t in targets] == queries[1::2]
    assert all(t < BYTE_VOCAB for t in ids[10:50] + ids[60:])  # gap and tail are text


def test_passkey_depth(maker):
    n = PASSKEY_DIGITS
    haystack = 100 - 2 * (n + 1)
    for depth, expect in ((0.0, 0), (1.0, haystack), (0.5, haystack // 2)):
        s = maker.passkey(random.Random(1), 100, depth)
        assert s.input_ids[expect] == VOCAB.passkey_marker and s.input_ids[99 - n] == VOCAB.passkey_marker
        assert s.input_ids[expect + 1 : expect + 1 + n] == s.input_ids[100 - n :] == s.labels[100 - n :]
        assert all(t == IGNORE for t in s.labels[: 100 - n])


def test_task_errors(maker):
    with pytest.raises(ValueError, match="too short for 30 pairs"):
        TaskMaker(Vocab(64, 64), maker.text).recall(random.Random(0), 100, 30)
    with pytest.raises(ValueError, match="num_pairs must be in 1..16"):
        maker.recall(random.Random(0), 100, 17)
    with pytest.raises(ValueError, match="depth must be in"):
        maker.passkey(random.Random(0), 100, 1.5)


class LookupModel(torch.nn.Module):
    """Predicts, after any token, the token that followed the previous occurrence of the last two tokens (or,
    if they never occurred, of the last token): a perfect oracle for both retrieval tasks."""

    def __init__(self, vocab_size: int, perfect: bool = True):
        super().__init__()
        self.vocab_size, self.perfect = vocab_size, perfect

    def forward(self, input_ids, use_cache=False):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            after_one: dict[int, int] = {}
            after_two: dict[tuple[int, int], int] = {}
            seq = input_ids[b].tolist()
            for t in range(T):
                if t > 0:
                    after_one[seq[t - 1]] = seq[t]
                if t > 1:
                    after_two[seq[t - 2], seq[t - 1]] = seq[t]
                bigram = (seq[t - 1], seq[t]) if t > 0 else None
                guess = after_two[bigram] if bigram in after_two else after_one.get(seq[t], 0)
                guess = guess if self.perfect else 0
                logits[b, t, guess] = 1.0
        return SimpleNamespace(logits=logits)


def test_scoring_reaches_both_ends(maker):
    cfg = LeaderboardConfig(
        train_length=64,
        eval_pairs=4,
        eval_samples=6,
        eval_batch_size=4,
        passkey_samples=3,
        passkey_depths=[0.0, 0.5],
        num_keys=16,
        num_values=16,
    )
    assert evaluate_recall(LookupModel(VOCAB.size), maker, cfg, 64) == 1.0
    assert evaluate_recall(LookupModel(VOCAB.size, perfect=False), maker, cfg, 64) == 0.0
    assert evaluate_passkey(LookupModel(VOCAB.size), maker, cfg, 64) == {"0": 1.0, "0.5": 1.0}
    assert evaluate_passkey(LookupModel(VOCAB.size, perfect=False), maker, cfg, 64) == {"0": 0.0, "0.5": 0.0}


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def test_mixture_loss_weighs_every_sample_alike():
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 11)
    ids = torch.randint(0, 11, (3, 8))
    labels = torch.full((3, 8), IGNORE)
    labels[0, 1:] = ids[0, 1:]  # seven targets
    labels[1, 5] = 4  # one target
    # row 2: no target, so it must not count at all
    got = mixture_loss(FixedLogits(logits), ids, labels)
    log_p = torch.log_softmax(logits, dim=-1)
    row0 = -sum(log_p[0, t - 1, int(ids[0, t])] for t in range(1, 8)) / 7
    row1 = -log_p[1, 4, 4]
    assert torch.allclose(got, (row0 + row1) / 2, rtol=1e-6)
    # the per-token mean would weigh row 0 seven times as much as row 1: a different number
    assert not torch.allclose(got, (7 * row0 + row1) / 8, rtol=1e-3)
    with pytest.raises(ValueError, match="no targets"):
        mixture_loss(FixedLogits(logits), ids, torch.full((3, 8), IGNORE))


def test_architecture_spec():
    e = parse_architecture("zoo_rwkv:version=4,head_size=8")
    assert (e.model_type, e.overrides) == ("zoo_rwkv", {"version": 4, "head_size": 8})
    with pytest.raises(ValueError, match="expected model_type:key=value"):
        parse_architecture("zoo_rwkv:version")


def test_segment_models_train_across_a_segment_boundary():
    from eval.leaderboard.run import size_architectures

    cfg = LeaderboardConfig(architectures=["zoo_transformer", "zoo_infini", "zoo_rmt"], train_length=64)
    entries = [parse_architecture(a) for a in cfg.architectures]
    size_architectures(entries, cfg, Vocab())
    # two segments per training sequence: the memory is written and read while training
    assert [getattr(e.config, "segment_length", None) for e in entries] == [None, 32, 32]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lrs": [float("nan")]}, "lrs must be positive finite"),
        ({"eval_multiples": [0, 2]}, "eval_multiples must be >= 1"),
        ({"eval_pairs": 100}, "eval_pairs=100 needs train_length"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"extension_methods": ["stretch"]}, "extension_methods must be among"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeaderboardConfig(**kwargs)


TOY = dict(
    hidden_size=48,
    train_length=32,
    eval_multiples=[1, 2],
    steps=3,
    batch_size=2,
    lrs=[1e-3, 3e-3],
    eval_samples=2,
    eval_pairs=2,
    passkey_samples=1,
    passkey_depths=[0.5],
    perplexity_windows=1,
    validation_batches=1,
    decode_steps=2,
    extension_methods=["yarn"],
    extension_factors=[2],
    corpus_max_files=5,
    progress=False,
)


def test_unknown_architecture_fails_before_writing(tmp_path):
    out = tmp_path / "lb"
    with pytest.raises(ValueError, match="not registered causal architectures: \\['zoo_nope'\\]"):
        run_leaderboard(LeaderboardConfig(architectures=["zoo_transformer", "zoo_nope"], **TOY), out)
    assert not out.exists()


def test_toy_leaderboard_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    from eval.leaderboard.report import write_report

    out = tmp_path / "lb"
    result = run_leaderboard(
        LeaderboardConfig(architectures=["zoo_transformer", "zoo_retnet", "zoo_longformer"], **TOY), out
    )
    models = result["models"]
    assert list(models) == ["zoo_transformer", "zoo_retnet", "zoo_longformer"]
    ref = models["zoo_transformer"]["num_parameters"]
    for name, record in models.items():
        assert abs(record["num_parameters"] / ref - 1) <= 0.10, name
        assert record["steps"] == 3 and len(record["losses"]) == 3
        assert {s["lr"] for s in record["sweep"]} == {1e-3, 3e-3}
        for task in ("recall", "passkey"):
            assert set(record["quality"][task]) == {32, 64}
            assert all(0.0 <= v <= 1.0 for v in record["quality"][task].values())
        assert all(v > 1.0 for v in record["quality"]["perplexity"].values())
        assert record["cost"]["train_tokens_per_s"] > 0 and record["cost"]["decode_ms_per_token"] > 0
        loaded = AutoModelForCausalLM.from_pretrained(out / record["saved_to"])
        assert loaded.config.model_type == name
        assert (out / record["saved_to"] / "README.md").is_file()
    # the rotary baseline is also evaluated with its context extended; RetNet (xPos / own rotation) is not
    assert list(models["zoo_transformer"]["extended"]) == ["yarnx2"]
    assert models["zoo_retnet"]["extended"] == {}
    assert json.loads((out / "leaderboard.json").read_text())["steps"] == 3

    report = write_report(out).read_text()
    assert "| zoo_transformer | " in report and "| zoo_retnet | " in report
    assert "| zoo_transformer +yarnx2 | " in report
    for png in (
        "accuracy_vs_length.png",
        "perplexity_vs_length.png",
        "quality_vs_speed.png",
        "training_curves.png",
    ):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report


def test_cli_rejects_bad_arguments_before_writing(tmp_path, capsys):
    from eval.leaderboard.__main__ import main

    out = tmp_path / "lb"
    assert main(["--out", str(out), "--lrs", "-1", "--no-progress"]) == 2
    assert "lrs must be positive finite" in capsys.readouterr().err
    assert not out.exists()
