"""Tiny configurations of every registered architecture, for the shared model suite.

Every ``model_type`` in ``zoo.REGISTRY`` must appear here; ``test_every_architecture_has_a_tiny_config`` fails
otherwise, so a new architecture cannot skip the shared checks.
"""

TINY = {
    # segments of 4 tokens: the shared checks' sequences span several, memory and padding included
    "zoo_infini": dict(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        segment_length=4,
        memory_update="delta",
    ),
    "zoo_transformer": dict(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "zoo_retnet": dict(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        chunk_size=8,
    ),
    "zoo_mamba": dict(
        vocab_size=259,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
    ),
    "zoo_mamba2": dict(
        vocab_size=259,
        hidden_size=32,
        num_heads=8,
        head_dim=8,
        state_size=8,
        n_groups=2,
        num_hidden_layers=2,
        chunk_size=16,
    ),
    # every mixer kind, a layer without MLP, a window shorter than the test sequences, partial rotary
    "zoo_hybrid": dict(
        vocab_size=259,
        hidden_size=32,
        layer_types=["mamba", "sliding_attention", "mamba2", "attention"],
        mlp_layers=[True, True, False, True],
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        mamba=dict(state_size=8, expand=2, conv_kernel=4),
        mamba2=dict(num_heads=8, head_dim=8, state_size=8, n_groups=2, chunk_size=16),
    ),
    # RWKV-7; "zoo_rwkv@v4" and "zoo_rwkv@v6" below are the other versions (a "@" names a variant of a model_type)
    "zoo_rwkv": dict(
        version=7,
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        head_size=8,
        intermediate_size=64,
        decay_low_rank_dim=8,
        a_low_rank_dim=8,
        v_low_rank_dim=8,
        gate_low_rank_dim=8,
    ),
    "zoo_rwkv@v4": dict(version=4, vocab_size=259, hidden_size=32, num_hidden_layers=2, intermediate_size=64),
    "zoo_rwkv@v6": dict(
        version=6,
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        head_size=8,
        intermediate_size=64,
        proj_low_rank_dim=4,
        decay_low_rank_dim=8,
    ),
    # per-layer windows (2 and 4 tokens back for the causal variant) shorter than the test sequences
    "zoo_longformer": dict(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=[2, 4],
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        sep_token_id=1,
    ),
    # 2-token blocks, so that the suite's inputs (up to 33 tokens) span many blocks: window, global and random
    "zoo_bigbird": dict(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        block_size=2,
        num_random_blocks=1,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        sep_token_id=1,
    ),
    # chunks of 64 positions, longer than the suite's inputs (up to 33 tokens): its generic checks hold for plain
    # attention only. Hashed chunks change with padding (padding tokens take slots of the sorted order), with
    # packing, and with later tokens (a query's chunk neighbours in bucket order shift as tokens arrive), and local
    # chunks of positions shift under left padding; tests/models/test_reformer.py checks those regimes instead
    "zoo_reformer": dict(
        vocab_size=259,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        attn_layers=["local", "lsh"],
        feed_forward_size=64,
        local_attn_chunk_length=64,
        lsh_attn_chunk_length=64,
        num_hashes=2,
        num_buckets=4,
        axial_pos_shape=[8, 16],
        axial_pos_embds_dim=[8, 24],
        max_position_embeddings=128,
    ),
    # RMT over a tiny zoo_transformer: 2 memory tokens, segments of 8 tokens (the suite's inputs span 1 to 5)
    "zoo_rmt": dict(
        backbone=dict(
            model_type="zoo_transformer",
            vocab_size=259,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        ),
        num_mem_tokens=2,
        segment_length=8,
    ),
    # order 3 (two long convolutions, the interleaved filter layout); a grid of 16 positions, shorter than the
    # suite's longest inputs, so that the grid's extension runs too
    "zoo_hyena": dict(
        vocab_size=259,
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        order=3,
        filter_order=8,
        emb_dim=5,
        max_position_embeddings=16,
    ),
}


# ALiBi instead of RoPE: a bias computed at each call, which a save / load round trip must keep
TINY["zoo_transformer@alibi"] = {**TINY["zoo_transformer"], "position_embedding_type": "alibi"}


def model_type_of(name: str) -> str:
    """The ``model_type`` of a ``TINY`` key: the key itself, or what precedes the "@" of a variant."""
    return name.split("@")[0]


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY[model_type], **overrides}
    return AutoConfig.for_model(model_type_of(model_type), **kwargs)
