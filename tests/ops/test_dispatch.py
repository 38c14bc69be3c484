"""Backend selection (zoo.ops.dispatch): the backend= argument, then ZOO_BACKEND, then the device."""

from __future__ import annotations

import logging

import pytest
import torch

from zoo.ops import dispatch
from zoo.ops.dispatch import resolve_backend


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("ZOO_BACKEND", raising=False)


@pytest.mark.parametrize("name", ["naive", "torch", "triton", "TORCH"])
def test_argument_wins(monkeypatch, name):
    monkeypatch.setenv("ZOO_BACKEND", "naive" if name.lower() != "naive" else "torch")
    assert resolve_backend("op", name, torch.device("cpu")) == name.lower()


def test_env_var_beats_device(monkeypatch):
    monkeypatch.setenv("ZOO_BACKEND", "naive")
    assert resolve_backend("op", None, torch.device("cpu")) == "naive"
    monkeypatch.setenv("ZOO_BACKEND", "")
    assert resolve_backend("op", None, torch.device("cpu")) == "torch"


def test_device_default(monkeypatch):
    assert resolve_backend("op", None, torch.device("cpu")) == "torch"
    assert resolve_backend("op", None, None) == "torch"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert resolve_backend("op", None, torch.device("cuda")) == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert resolve_backend("op", None, torch.device("cuda")) == "torch"


def test_unknown_names_raise(monkeypatch):
    with pytest.raises(ValueError, match=r"backend='cuda' \(from argument\) is not one of"):
        resolve_backend("op", "cuda")
    monkeypatch.setenv("ZOO_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"backend='fast' \(from ZOO_BACKEND\)"):
        resolve_backend("op", None)


def test_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("op", "triton")


def test_choice_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="zoo.ops"):
        resolve_backend("some_op", "naive")
        resolve_backend("some_op", "naive")
    assert [r.getMessage() for r in caplog.records] == [
        "zoo.ops.some_op: using the naive backend (chosen by argument)"
    ]


@pytest.mark.parametrize("name", ["naive", "torch", "triton"])
def test_retention_routes_to_the_chosen_backend(monkeypatch, name):
    """retention() calls exactly the form that dispatch picked, whether by argument or by ZOO_BACKEND."""
    from zoo.ops.retention import chunk, naive, retention
    from zoo.ops.retention import triton as triton_impl

    calls = []
    forms = {
        "naive": (naive, "naive_recurrent_retention"),
        "torch": (chunk, "chunk_retention"),
        "triton": (triton_impl, "triton_retention"),
    }
    for backend, (module, attr) in forms.items():
        original = getattr(module, attr)

        def spy(*args, _backend=backend, _original=original, **kwargs):
            calls.append(_backend)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)

    q = torch.randn(1, 5, 2, 16)
    v = torch.randn(1, 5, 2, 16)
    decay = torch.full((2,), -0.1)
    out_arg, _ = retention(q, q, v, decay, backend=name)
    monkeypatch.setenv("ZOO_BACKEND", name)
    out_env, _ = retention(q, q, v, decay)
    assert calls == [name, name]
    torch.testing.assert_close(out_arg, out_env)
