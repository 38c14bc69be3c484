"""The delta rule's Triton kernels (zoo.ops.delta_rule.triton) at head sizes other than RWKV-7's 64: output, final
state and every gradient in float32 against the float64 naive oracle (tests/ops/harness.py, tolerance 5e-5), under
TRITON_INTERPRET=1 at small T. Key and value sizes are padded to the kernels' blocks and masked, so sizes that are
not powers of two, and keys and values of different sizes, are supported; these check it at sizes where the
padding, the number of key tiles of the pair kernels (16 channels each) and of value tiles (up to 32 channels)
differ. The generalised delta rule of RWKV-7 (Peng et al., 2025, arXiv:2503.14456)."""

from __future__ import annotations

import pytest
import torch

from .harness import check_forward_backward, check_state_chaining
from .test_delta_rule import F32, SEQ_DIMS, make_inputs, naive_op, op


@pytest.mark.parametrize(
    ("dk", "dv"),
    [(16, 16), (32, 32), (32, 16), (16, 32), (24, 40)],
    ids=["16", "32", "k32_v16", "k16_v32", "k24_v40"],
)
def test_triton_head_sizes_forward_backward(dk, dv):
    """19 tokens (a full chunk of 16 and a partial one), an initial state, decays from none to strong."""
    inputs = make_inputs(19, B=1, decay="mixed", dk=dk, dv=dv)
    check_forward_backward(op("triton"), naive_op(), inputs, dtype=torch.float32, what=f"Dk={dk} Dv={dv}")


@pytest.mark.parametrize("head_size", [16, 32])
def test_triton_head_sizes_rwkv7_decay_and_state_chaining(head_size):
    """RWKV-7's decay range, and [0, 7) then [7, 21) from the first part's final state equals the whole."""
    inputs = make_inputs(21, B=1, dk=head_size, dv=head_size, seed=1)
    check_forward_backward(op("triton"), naive_op(), inputs, dtype=torch.float32, what=f"head {head_size}")
    inputs = {n: x.float() for n, x in inputs.items()}
    check_state_chaining(op("triton"), inputs, split=7, seq_dims=SEQ_DIMS, tol=F32)
