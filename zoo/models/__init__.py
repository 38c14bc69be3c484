"""Architectures of zoo; importing a package registers it with the Auto classes."""

from zoo.models import (  # noqa: F401
    bigbird,
    hybrid,
    hyena,
    infini,
    longformer,
    mamba,
    mamba2,
    reformer,
    retnet,
    rmt,
    rwkv,
    transformer,
)
from zoo.models.registry import REGISTRY, default_lora_targets, register

__all__ = ["REGISTRY", "default_lora_targets", "register"]
