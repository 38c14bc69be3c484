"""Weight-decay groups and learning-rate schedules."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import zoo  # noqa: F401
from zoo.training.optim import build_optimizer, build_scheduler, decay_parameter_names
from zoo.training.recipe import OptimConfig, ScheduleConfig


def tiny_model(**kw):
    config = AutoConfig.for_model(
        "zoo_transformer",
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        attention_bias=True,
        **kw,
    )
    return AutoModelForCausalLM.from_config(config)


def test_no_decay_on_norms_biases_embeddings():
    model = tiny_model()
    decay = decay_parameter_names(model)
    names = dict(model.named_parameters())
    assert decay, "projection matrices take weight decay"
    for name in names:
        no_decay = "norm" in name or name.endswith(".bias") or "embed" in name
        assert (name in decay) != no_decay, name
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)


def test_tied_embeddings_are_not_decayed():
    model = tiny_model(tie_word_embeddings=True)
    assert not any("embed" in n or "lm_head" in n for n in decay_parameter_names(model))


def lr_trace(schedule: ScheduleConfig, max_steps: int, steps: int) -> list[float]:
    """The learning-rate multiplier in effect at optimizer steps 0..steps-1 (base lr 1)."""
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(lr=1.0))
    sched = build_scheduler(opt, schedule, max_steps)
    trace = []
    for _ in range(steps):
        trace.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return trace


def test_cosine_schedule():
    f = lr_trace(ScheduleConfig("cosine", warmup_steps=10, min_lr_ratio=0.1), max_steps=100, steps=101)
    # transformers' schedule one step ahead: the first step trains at lr / warmup_steps.
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[54] == pytest.approx(0.55) and f[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:100], f[10:100]))


def test_wsd_schedule():
    f = lr_trace(ScheduleConfig("wsd", warmup_steps=10, min_lr_ratio=0.0, decay_ratio=0.2), 100, 100)
    assert f[4] == pytest.approx(0.5)
    assert all(v == 1.0 for v in f[9:80])
    assert f[89] == pytest.approx(0.5) and f[99] == pytest.approx(0.0)
    # A warmup longer than the stable phase: straight from warmup into the decay, never a jump.
    g = lr_trace(ScheduleConfig("wsd", warmup_steps=90, min_lr_ratio=0.0, decay_ratio=0.2), 100, 100)
    assert g[89] == pytest.approx(1.0) and g[99] == pytest.approx(0.5)


def test_constant_schedule():
    f = lr_trace(ScheduleConfig("constant", warmup_steps=4), 20, 20)
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and set(f[3:]) == {1.0}


def test_scheduler_state_round_trips():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(lr=1.0))
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=2), max_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    fresh = build_scheduler(build_optimizer(model, OptimConfig(lr=1.0)), ScheduleConfig(warmup_steps=2), 10)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 4 and fresh.get_last_lr() == sched.get_last_lr()
