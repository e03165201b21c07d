"""Optimizer and schedule construction shared by every algorithm."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from aa_lightning.algorithms.config import OptimConfig


def param_groups(modules: Iterable[nn.Module], weight_decay: float, lr: float | None = None) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and non-decayed (biases, norms) groups."""
    decay, no_decay = [], []
    for module in modules:
        for _, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lr is not None:
        for group in groups:
            group["lr"] = lr
    return [g for g in groups if g["params"]]


def lr_lambda(config: OptimConfig, total_steps: int):  # noqa: ANN201
    """Multiplier of the peak lr at a given optimizer step."""
    warmup = (
        config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    )
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.scheduler == "cosine" else 1.0 - progress
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape

    return factor


def build_optimizer(
    groups: list[dict], config: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, dict]:
    """AdamW + a per-step LambdaLR in Lightning's ``lr_scheduler`` dict form.

    Groups may carry their own ``lr`` (e.g. actor and critic in one DeepSpeed optimizer); the schedule
    scales each group's own peak lr.
    """
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    scheduler = LambdaLR(optimizer, lr_lambda(config, total_steps))
    return optimizer, {"scheduler": scheduler, "interval": "step", "frequency": 1}
