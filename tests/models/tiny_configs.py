"""Tiny configurations of every registered architecture, for the shared model suite.

Every ``model_type`` in ``zoo.REGISTRY`` must appear here; ``test_every_architecture_has_a_tiny_config`` fails
otherwise, so a new architecture cannot skip the shared checks.
"""

TINY = {
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
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)
