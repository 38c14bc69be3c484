"""AdamW with weight-decay groups, and the learning-rate schedules of a recipe.

Weight decay pulls weights toward zero; that is wanted for projection matrices and unwanted for gains and offsets
(norm weights, biases) and for embedding tables, whose rows are only updated when their token appears.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from zoo.training.recipe import OptimConfig, ScheduleConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that take weight decay: matrices outside embeddings and norms."""
    no_decay_ids = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        if isinstance(module, nn.Embedding) or is_norm:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    return {
        name
        for name, param in model.named_parameters()
        if param.requires_grad and param.ndim >= 2 and id(param) not in no_decay_ids
    }


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay = decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


@dataclass
class LRMultiplier:
    """Learning-rate multiplier at optimizer step ``step`` (a picklable callable for ``LambdaLR``)."""

    name: str
    max_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.2

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        if self.name == "cosine":
            span = max(self.max_steps - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / span, 1.0)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "wsd":
            decay_steps = max(round(self.decay_ratio * self.max_steps), 1)
            decay_start = self.max_steps - decay_steps
            if step < decay_start:
                return 1.0
            progress = min((step - decay_start) / decay_steps, 1.0)
            return 1.0 - (1 - self.min_lr_ratio) * progress
        raise ValueError(f"schedule.name: unknown schedule {self.name!r}; use cosine, wsd or constant")


def build_scheduler(optimizer, cfg: ScheduleConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = LRMultiplier(cfg.name, max_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
