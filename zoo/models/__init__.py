"""Architectures of zoo; importing a package registers it with the Auto classes."""

from zoo.models import hybrid, longformer, mamba, mamba2, retnet, rwkv, transformer  # noqa: F401
from zoo.models.registry import REGISTRY, default_lora_targets, register

__all__ = ["REGISTRY", "default_lora_targets", "register"]
