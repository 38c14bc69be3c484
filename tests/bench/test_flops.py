"""The sparse-attention FLOP counters of ``bench/flops.py`` (Longformer: Beltagy et al. 2020, arXiv:2004.05150;
BigBird: Zaheer et al. 2020, arXiv:2007.14062) against hand counts written out here, and against the patterns the
models run: the allowed (query, key) pairs of ``zoo.ops.sparse_attention``'s dense oracle, and the Longformer
projections a forward actually applies."""

from __future__ import annotations

import pytest
import torch

from bench import flops
from zoo.models.bigbird import ZooBigBirdConfig
from zoo.models.longformer import ZooLongformerConfig, ZooLongformerForMaskedLM
from zoo.ops.sparse_attention import SparsePattern
from zoo.ops.sparse_attention.naive import block_counts, dense_allowed


def test_longformer_window_pairs_by_hand():
    # attention_window 4 is the whole window: 2 keys on each side and the query itself, cut at the ends
    assert flops.window_pairs(6, 4, causal=False) == 3 + 4 + 5 + 5 + 4 + 3
    # causal: the 4 tokens before and the query: the same 5 keys once the window is full
    assert flops.window_pairs(7, 4, causal=True) == 1 + 2 + 3 + 4 + 5 + 5 + 5
    # window 2 (1 each side), the first token global: it sees all 6 keys; t = 1 sees {0, 1, 2}; t = 2, 3, 4 their
    # three plus the global key 0; t = 5 sees {4, 5} and 0
    assert flops.window_pairs(6, 2, causal=False, global_tokens=1) == 6 + 3 + 4 + 4 + 4 + 3
    # two global tokens, window 2: rows 0 and 1 see all 7; t = 2 {1, 2, 3} + 0; t = 3, 4, 5 their three + 0 and 1;
    # t = 6 {5, 6} + 0 and 1
    assert flops.window_pairs(7, 2, causal=False, global_tokens=2) == 2 * 7 + 4 + 5 + 5 + 5 + 4
    with pytest.raises(ValueError, match="causal"):
        flops.window_pairs(7, 4, causal=True, global_tokens=1)


@pytest.mark.parametrize("T, window, g", [(13, 4, 0), (13, 6, 1), (20, 4, 3), (9, 16, 2)])
def test_longformer_window_pairs_equal_the_oracle_pattern(T, window, g):
    """The pairs the op's dense oracle allows for the model's pattern (one-sided window // 2, the first g tokens
    global)."""
    pattern = SparsePattern(window=window // 2)
    is_global = (torch.arange(T) < g)[None] if g else None
    allowed = dense_allowed(pattern, T, is_global, None, None, "cpu")
    assert flops.window_pairs(T, window, causal=False, global_tokens=g) == int(allowed.sum())
    causal = dense_allowed(SparsePattern(window=window, causal=True), T, None, None, None, "cpu")
    assert flops.window_pairs(T, window, causal=True) == int(causal.sum())


def _longformer(**overrides):
    torch.manual_seed(0)
    config = ZooLongformerConfig(
        vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
        attention_window=2, max_position_embeddings=20, **overrides,
    )  # fmt: skip
    return ZooLongformerForMaskedLM(config).eval()


def test_longformer_flops_by_hand():
    """Width 8, two layers of two heads of 4, MLP 12, vocabulary 11, window 2; B = 2, T = 6."""
    model = _longformer()
    terms = flops.forward_flops(model, "sliding_window", 2, 6)
    # per token: q, k, v, o 4 * 8 * 8 and up, down 2 * 8 * 12 per layer; LM head 8 * 8 + 8 * 11 (the global
    # projections are not applied without global tokens); 2 FLOPs each; B * T = 12 tokens
    assert terms["dense"] == 2 * 12 * (2 * (4 * 64 + 2 * 96) + 64 + 88)
    # window 2: 2 + 3 + 3 + 3 + 3 + 2 = 16 pairs per row, QK^T and PV 2 * 2 * 8 wide (heads * head width), 2 layers
    assert terms["sliding_window_attention"] == 2 * 2 * 2 * 2 * 8 * 16
    assert "global_projections" not in terms
    # the first token global: 6 + 3 + 4 + 4 + 4 + 3 = 24 pairs; its global query 8 * 8 and every token's global key
    # and value 2 * 8 * 8, 2 FLOPs each, 2 layers, batch 2
    glob = flops.forward_flops(model, "sliding_window", 2, 6, global_tokens=1)
    assert glob["dense"] == terms["dense"]
    assert glob["sliding_window_attention"] == 2 * 2 * 2 * 2 * 8 * 24
    assert glob["global_projections"] == 2 * 2 * 2 * (64 * 1 + 2 * 64 * 6)
    assert flops.training_flops(model, "sliding_window", 2, 6) == 3 * terms["total"]
    with pytest.raises(ValueError, match="options"):
        flops.forward_flops(model, "block_sparse", 2, 6, global_tokens=1)


def test_longformer_counts_the_projections_the_forward_applies():
    """The global projections run only when a row has global tokens, so the dense term leaves them out; torch's own
    FLOP counter sees at least the counted projections (it counts no FLOPs for scaled_dot_product_attention on the
    CPU, which the blocked form runs its attention through, so the attention term is checked by hand above)."""
    model = _longformer()
    called = []
    for layer in model.model.layers:
        for name in ("q_global_proj", "k_global_proj", "v_global_proj"):
            getattr(layer.self_attn, name).register_forward_hook(lambda *_, n=name: called.append(n))
    ids = torch.randint(3, 11, (1, 6))
    no_globals = {"global_attention_mask": torch.zeros_like(ids)}
    measured = flops.measured_matmul_flops(model, ids, **no_globals)
    assert called == []
    terms = flops.forward_flops(model, "sliding_window", 1, 6)
    assert measured >= terms["dense"]
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    with torch.no_grad():
        model(ids, global_attention_mask=glob)
    assert len(called) == 3 * 2


def test_bigbird_block_pairs_by_hand():
    # T = 11, blocks of 2 (the last holds 1 token), window 3, one global block at each end, one random block.
    # Block 0 (global) sees all 11 keys, block 5 (global, 1 token) too. Block 1: window {0, 1, 2} and {5}: 2 x 7
    # plus one random block 2 x 2; blocks 2 and 3: five fixed blocks 2 x 9, plus 2 x 2; block 4: {3, 4, 5} and {0}
    # 2 x 7, plus 2 x 2
    assert flops.block_sparse_pairs(11, 2, 3, 1, 1, causal=False) == 22 + 11 + 18 + 22 + 22 + 18
    # causal, T = 13, blocks of 2, window 2, block 0 global, one random block: a block with itself counts the
    # 2 * 3 / 2 = 3 pairs at or before the query. Block 0: 3; block 1 {0, 1}: 4 + 3; block 2 {0, 1, 2}: 4 + 4 + 3,
    # no candidate left; blocks 3-5 {0, n-1, n}: 11 + a random 4; block 6 (1 token) {0, 5, 6}: 2 + 2 + 1 + 2
    assert flops.block_sparse_pairs(13, 2, 2, 1, 1, causal=True) == 3 + 7 + 11 + 3 * 15 + 7
    # a short input: every block in reach, dense causal attention
    assert flops.block_sparse_pairs(7, 2, 2, 1, 1, causal=True) == 7 * 8 // 2


@pytest.mark.parametrize(
    "T, block, window, glob, r, causal",
    [(11, 2, 3, 1, 1, False), (29, 4, 3, 1, 2, False), (30, 3, 5, 2, 1, False), (13, 2, 2, 1, 1, True),
     (29, 4, 3, 1, 2, True)],
)  # fmt: skip
def test_bigbird_block_pairs_equal_the_oracle_layout(T, block, window, glob, r, causal):
    """The (query, key) pairs of the op's dense oracle for zoo's seeded plan, over T real tokens."""
    pattern = SparsePattern(
        block_size=block, window_blocks=window, global_blocks=glob, random_blocks=r, causal=causal, seed=3
    )
    nb = pattern.num_blocks(T)
    index = torch.arange(T)[None]
    counts = block_counts(pattern, index, index, nb, pattern.random_plan(nb, 1))
    assert int(counts.max()) == 1  # the seeded plan repeats no block
    assert flops.block_sparse_pairs(T, block, window, glob, r, causal) == int(counts.sum())


def test_bigbird_full_attention_is_dense():
    """``original_full``, and transformers' switch to full attention for inputs of at most (5 + 2 r) b tokens under
    ``transformers_compat``: dense attention, T^2 pairs."""
    sizes = dict(
        vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
        block_size=2, num_random_blocks=1, max_position_embeddings=64,
    )  # fmt: skip
    per_pair = 2 * 4 * 8  # layers * (QK^T and PV, 2 FLOPs per multiply-add) * heads * head width
    full = ZooBigBirdConfig(**sizes, attention_type="original_full")
    assert flops.FAMILIES["block_sparse"](full, 1, 20) == {"block_sparse_attention": per_pair * 20 * 20}
    compat = ZooBigBirdConfig(**sizes, transformers_compat=True)
    assert flops.FAMILIES["block_sparse"](compat, 1, 14) == {"block_sparse_attention": per_pair * 14 * 14}
    sparse = flops.block_sparse_pairs(15, 2, 3, 1, 1, causal=False)
    assert sparse < 15 * 15
    assert flops.FAMILIES["block_sparse"](compat, 1, 15) == {"block_sparse_attention": per_pair * sparse}
    seeded = ZooBigBirdConfig(**sizes)
    assert flops.FAMILIES["block_sparse"](seeded, 1, 14) == {
        "block_sparse_attention": per_pair * flops.block_sparse_pairs(14, 2, 3, 1, 1, causal=False)
    }


def test_ssd_counts_the_chunk_the_scan_runs():
    """A Mamba-2 config without chunk_size counts the chunk its CPU scan picks (16 for heads of 16 with state 16):
    per head, 2 (N + P) n^2 for each chunk of n tokens and 4 N P per token; the short convolution 2 K channels."""
    from transformers import AutoModelForCausalLM

    from zoo.models.registry import sized_config

    model = AutoModelForCausalLM.from_config(sized_config("zoo_mamba2", 32, 1))
    cfg = model.config
    assert cfg.chunk_size is None and model.model.layers[0].mixer.scan_chunk_size(torch.device("cpu")) == 16
    H, N, P, T = cfg.num_heads, cfg.state_size, cfg.head_dim, 40  # chunks of 16, 16, 8
    ssd = H * (2 * (N + P) * (16**2 + 16**2 + 8**2) + 4 * N * P * T)
    conv = 2 * cfg.conv_kernel * (cfg.intermediate_size + 2 * cfg.n_groups * N) * T
    terms = flops.forward_flops(model, "ssd", 1, T)
    assert (terms["ssd"], terms["conv"]) == (ssd, conv)
    cfg.chunk_size = 8  # an explicit chunk is counted as given
    assert flops.forward_flops(model, "ssd", 1, T)["ssd"] == H * (2 * (N + P) * 5 * 8**2 + 4 * N * P * T)
    with pytest.raises(ValueError, match="global_tokens"):
        flops.forward_flops(model, "ssd", 1, T, global_tokens=2)


def test_hybrid_counts_its_mamba2_layers_like_mamba2():
    from transformers import AutoModelForCausalLM

    from zoo.models.registry import sized_config

    hybrid = AutoModelForCausalLM.from_config(sized_config("zoo_hybrid", 32, 2))
    m2 = hybrid.config.mixer_config("mamba2")
    n = hybrid.config.layer_types.count("mamba2")
    from zoo.ops.retention import default_chunk_size

    chunk = default_chunk_size("torch", m2.state_size, m2.head_dim)  # no chunk_size in the config
    assert m2.chunk_size is None and flops._ssd_chunk(m2) == chunk
    per_layer = flops._ssd_layer(
        1, 40, 32, m2.expand, m2.num_heads, m2.head_dim, m2.state_size, m2.n_groups, chunk, m2.conv_kernel
    )
    terms = flops.forward_flops(hybrid, "hybrid", 1, 40)
    assert n >= 1 and terms["ssd"] == n * per_layer["ssd"] > 0
