"""AdamW with weight-decay groups, and the learning-rate schedule of a recipe (transformers' ``get_scheduler``).

Weight decay pulls weights toward zero; that is wanted for projection matrices and unwanted for gains and offsets
(norm weights, biases) and for embedding tables, whose rows are only updated when their token appears.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import get_scheduler

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


def _one_step_ahead(multiplier, step: int) -> float:
    return multiplier(step + 1)


def _transformers_multiplier(cfg: ScheduleConfig, max_steps: int):
    """transformers' learning-rate multiplier, a function of the optimizer step, for the recipe's schedule."""
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=1.0)
    if cfg.name == "cosine":
        scheduler = get_scheduler(
            "cosine_with_min_lr",
            probe,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=max_steps,
            scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        )
    elif cfg.name == "wsd":
        decay_steps = round(cfg.decay_ratio * max_steps)
        scheduler = get_scheduler(
            "warmup_stable_decay",
            probe,
            num_warmup_steps=cfg.warmup_steps,
            # A warmup that overlaps the decay phase shortens the stable phase to zero, never below.
            num_training_steps=max(max_steps, cfg.warmup_steps + decay_steps),
            scheduler_specific_kwargs={
                "num_decay_steps": decay_steps,
                "decay_type": "linear",
                "min_lr_ratio": cfg.min_lr_ratio,
            },
        )
    elif cfg.name == "constant":
        scheduler = get_scheduler("constant_with_warmup", probe, num_warmup_steps=cfg.warmup_steps)
    else:
        raise ValueError(f"schedule.name: unknown schedule {cfg.name!r}; use cosine, wsd or constant")
    return scheduler.lr_lambdas[0]


def build_scheduler(optimizer, cfg: ScheduleConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedules: linear warmup over ``warmup_steps``, then ``cosine`` decay to ``min_lr_ratio`` at
    ``max_steps``, ``wsd`` (constant, then linear decay to ``min_lr_ratio`` over the last ``decay_ratio`` of the
    steps) or ``constant``."""
    multiplier = _transformers_multiplier(cfg, max_steps)
    # One step ahead of transformers': the first optimizer step trains at lr / warmup_steps, theirs spends it at 0.
    # (A partial, not a closure: LambdaLR's state_dict then stores nothing of it, and a resumed run's own schedule
    # applies.)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_one_step_ahead, multiplier))
