"""Long convolution (zoo.ops.long_conv): the FFT, blocked Toeplitz and Triton forms against the naive oracle.

Every form is checked on the output, the final state and the gradient of every input (u, the filter h, the skip D,
the initial state), at odd lengths, with filters shorter than, equal to and longer than the sequence. Tolerances
are the harness's: 1e-11 for float64 runs, 5e-5 for float32 runs (Triton under the interpreter), both against the
float64 oracle.
"""

from __future__ import annotations

import functools

import pytest
import torch

from zoo.ops.long_conv import chunk, long_conv, long_conv_step

from .harness import TOLERANCE, check_forward_backward, check_state_chaining, check_step, check_varlen

C = 5
SEQ_DIMS = {"u": 1}


def make_inputs(T: int, *, L: int | None = None, batch: int = 2, S: int | None = 3, D: bool = True, seed=0):
    """float64 inputs: u (batch, T, C), filter h (C, L) (L = T by default), D (C,), S inputs of history."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "u": randn(batch, T, C),
        "h": randn(C, L or max(T, 1)) / 3,
        "D": randn(C) if D else None,
        "initial_state": randn(batch, C, S) if S is not None else None,
    }


def op(backend: str, method: str | None = None):
    return functools.partial(long_conv, output_final_state=True, backend=backend, method=method)


TORCH_FORMS = [("torch", "fft"), ("torch", "toeplitz"), ("torch", None)]


def test_naive_equals_the_sum_written_out():
    """One channel, L = 2, one input of history: y_t = h0 u_t + h1 u_{t-1} + D u_t."""
    u = torch.tensor([[[1.0], [2.0], [-1.0]]], dtype=torch.float64)
    h = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    y, final = long_conv(
        u, h, torch.tensor([0.25]).double(), initial_state=torch.tensor([[[4.0]]]).double(),
        output_final_state=True, backend="naive",
    )  # fmt: skip
    expected = [0.5 * 1 - 2 * 4 + 0.25, 0.5 * 2 - 2 * 1 + 0.5, 0.5 * -1 - 2 * 2 - 0.25]
    assert y.flatten().tolist() == expected and final.flatten().tolist() == [-1.0]


@pytest.mark.parametrize(("backend", "method"), TORCH_FORMS)
@pytest.mark.parametrize(("T", "L"), [(1, 1), (7, 7), (33, 33), (33, 10), (64, 64), (65, 40), (9, 20)])
def test_forward_backward(backend, method, T, L):
    """Filters equal to (L = T), shorter than and longer than (9, 20) the sequence; three steps of history."""
    inputs = make_inputs(T, L=L)
    check_forward_backward(op(backend, method), op("naive"), inputs, what=f"{method} T={T} L={L}")


@pytest.mark.parametrize(("backend", "method"), TORCH_FORMS)
def test_forward_backward_float32_without_history_or_skip(backend, method):
    inputs = make_inputs(50, L=31, S=None, D=False)
    check_forward_backward(op(backend, method), op("naive"), inputs, dtype=torch.float32)


@pytest.mark.parametrize("width", [1, 2, C])
def test_fft_in_channel_blocks(monkeypatch, width):
    """The FFT form a block of channels at a time (1, 2 or all 5 channels a block; 2 leaves a last block of one),
    with the skip folded into the filter's spectrum: output, final state and every gradient against the oracle."""
    T, S, batch = 33, 3, 2
    monkeypatch.setattr(chunk, "FFT_BLOCK_ELEMENTS", width * batch * 2 * (T + S))
    assert len(chunk.channel_blocks(C, batch * 2 * (T + S))) == -(-C // width)
    check_forward_backward(op("torch", "fft"), op("naive"), make_inputs(T, L=20, S=S, batch=batch))


@pytest.mark.parametrize("needs", [("u",), ("D",), ("h",), ("u", "D")])
def test_fft_gradients_of_some_inputs(monkeypatch, needs):
    """Only some inputs require gradients (the skip alone, the filter alone, ...): those gradients still equal the
    oracle's, in channel blocks of 2."""
    monkeypatch.setattr(chunk, "FFT_BLOCK_ELEMENTS", 2 * 2 * 2 * 40)
    inputs = make_inputs(40, L=40, S=None)
    grads = {}
    for name, fn in (("fft", op("torch", "fft")), ("naive", op("naive"))):
        leaves = {
            k: (v.clone().requires_grad_(k in needs) if v is not None else None) for k, v in inputs.items()
        }
        y, _ = fn(**leaves)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        grads[name] = {k: leaves[k].grad for k in needs}
        assert all(leaves[k].grad is None for k in leaves if k not in needs and leaves[k] is not None)
    for k in needs:
        torch.testing.assert_close(grads["fft"][k], grads["naive"][k], rtol=TOLERANCE[torch.float64], atol=0)


@pytest.mark.parametrize(("T", "L", "S"), [(1, 1, None), (19, 19, 3), (40, 23, 5), (21, 30, None)])
def test_triton_forward_backward(T, L, S):
    """The Triton kernels (interpreted here) in float32 against the float64 oracle: blocks of 16 steps and 32
    channels, so 19 and 40 steps cut blocks and 5 channels fill one block partly."""
    inputs = make_inputs(T, L=L, S=S)
    check_forward_backward(op("triton"), op("naive"), inputs, dtype=torch.float32, what=f"T={T} L={L}")


def test_triton_several_channel_blocks_and_sequences():
    """70 channels (three channel blocks) and a batch of 3."""
    gen = torch.Generator().manual_seed(3)
    inputs = {
        "u": torch.randn(3, 18, 70, generator=gen, dtype=torch.float64),
        "h": torch.randn(70, 18, generator=gen, dtype=torch.float64) / 4,
        "D": torch.randn(70, generator=gen, dtype=torch.float64),
    }
    check_forward_backward(op("triton"), op("naive"), inputs, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_state_chaining(backend):
    """[0, 9) then the rest from the first part's final state (the last L - 1 inputs) equals the whole."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = {n: x.to(dtype) for n, x in make_inputs(30, L=12).items()}
    check_state_chaining(op(backend), inputs, split=9, seq_dims=SEQ_DIMS, tol=TOLERANCE[dtype] * 10)


@pytest.mark.parametrize(("backend", "method"), [*TORCH_FORMS, ("triton", None)])
def test_varlen(backend, method):
    """Four packed sequences (lengths 11, 1, 30, 2, each with its own history) equal four separate calls, outputs,
    final states and gradients."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    shared = make_inputs(1, L=16, batch=1)
    sequences = []
    for i, T in enumerate((11, 1, 30, 2)):
        seq = {**make_inputs(T, batch=1, seed=i + 1), "h": shared["h"], "D": shared["D"]}
        sequences.append({n: x.to(dtype) for n, x in seq.items()})
    check_varlen(op(backend, method), sequences, seq_dims=SEQ_DIMS, tol=TOLERANCE[dtype] * 10, what=backend)


def test_packed_with_empty_sequences_equals_the_oracle():
    lengths = (0, 5, 1, 0, 17)
    inputs = make_inputs(sum(lengths), L=9, batch=1, S=None)
    inputs["initial_state"] = torch.randn(len(lengths), C, 2, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    check_forward_backward(
        functools.partial(op("torch"), cu_seqlens=cu), functools.partial(op("naive"), cu_seqlens=cu), inputs
    )


def test_step_equals_forward():
    """Decoding token by token with long_conv_step from the last L - 1 inputs equals the full forward."""
    inputs = make_inputs(20, L=8)

    def step(token, state):
        return long_conv_step(token["u"], token["h"], token["D"], state)

    check_step(op("torch"), step, inputs, seq_dims=SEQ_DIMS, tol=TOLERANCE[torch.float64])


def test_step_from_the_whole_history():
    """The step reads any number of cached inputs: the whole history, or none."""
    inputs = make_inputs(12, L=12, S=None)
    full, _ = op("naive")(**inputs)
    u, h, D = inputs["u"], inputs["h"], inputs["D"]
    for t in range(12):
        y, state = long_conv_step(u[:, t], h, D, u[:, :t].transpose(1, 2) if t else None)
        torch.testing.assert_close(y, full[:, t], rtol=1e-12, atol=1e-12)
    assert state.shape == (2, C, 11)


def test_length_chooses_the_form(monkeypatch):
    """Toeplitz up to TOEPLITZ_MAX_LEN tokens, FFT above."""
    used = []
    monkeypatch.setattr(chunk, "fft_conv", lambda x, h, D=None: used.append("fft") or x)
    monkeypatch.setattr(chunk, "toeplitz_conv", lambda x, h: used.append("toeplitz") or x)
    for T in (chunk.TOEPLITZ_MAX_LEN, chunk.TOEPLITZ_MAX_LEN + 1):
        long_conv(**make_inputs(T, S=None), backend="torch")
    assert used == ["toeplitz", "fft"]


def test_triton_backend_runs_long_filters_as_fft(monkeypatch):
    """On ``triton`` the direct kernel runs up to TRITON_DIRECT_MAX_TAPS taps of reach (min(L, S + T)), the FFT
    form beyond (the direct kernel is O(T L)); ``method`` forces a torch form. Each result against the oracle."""
    import zoo.ops.long_conv as long_conv_module
    from zoo.ops.long_conv import triton as triton_module

    used = []
    direct = triton_module.triton_long_conv
    monkeypatch.setattr(triton_module, "triton_long_conv", lambda *a: used.append("direct") or direct(*a))
    fft = chunk.fft_conv
    monkeypatch.setattr(chunk, "fft_conv", lambda *a: used.append("fft") or fft(*a))
    monkeypatch.setattr(long_conv_module, "TRITON_DIRECT_MAX_TAPS", 12)
    cases = [  # (T, L, S, method): the form expected
        ((9, 9, 3, None), "direct"),  # reach 9
        ((10, 40, 2, None), "direct"),  # reach S + T = 12
        ((10, 40, 3, None), "fft"),  # reach 13
        ((20, 13, None, None), "fft"),  # reach L = 13
        ((9, 9, 3, "fft"), "fft"),
    ]
    for (T, L, S, method), form in cases:
        used.clear()
        inputs = make_inputs(T, L=L, S=S)
        dtype = torch.float32 if form == "direct" else torch.float64
        got = long_conv(**{k: v.to(dtype) for k, v in inputs.items() if v is not None}, backend="triton",
                        method=method, output_final_state=True)  # fmt: skip
        want = long_conv(**inputs, backend="naive", output_final_state=True)
        assert used == [form], (T, L, S, method, used)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"u": torch.zeros(2, 6)}, r"u has shape \(2, 6\), expected \[B, T, C\]"),
        ({"h": torch.zeros(C + 1, 4, dtype=torch.float64)}, "h has shape"),
        ({"D": torch.zeros(C + 1, dtype=torch.float64)}, "D has shape"),
        ({"u": torch.zeros(2, 6, C, dtype=torch.int64)}, "u has dtype"),
        ({"initial_state": torch.zeros(3, C, 2, dtype=torch.float64)}, "initial_state has shape"),
        ({"cu_seqlens": torch.tensor([0, 3, 6])}, "B == 1"),
        ({"method": "dft"}, "method='dft'"),
    ],
)
def test_invalid_arguments(change, message):
    inputs = {**make_inputs(6), **change}
    with pytest.raises(ValueError, match=message):
        long_conv(**inputs, backend="torch")


def test_invalid_packing_and_steps():
    inputs = make_inputs(6, batch=1, S=None)
    with pytest.raises(ValueError, match="cu_seqlens runs from 0 to 5"):
        long_conv(**inputs, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="state has shape"):
        long_conv_step(inputs["u"][:, 0], inputs["h"], state=torch.zeros(2, C, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="u has shape"):
        long_conv_step(inputs["u"], inputs["h"])
