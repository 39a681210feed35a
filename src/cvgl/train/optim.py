"""AdamW over the trainable parameters, stepped per batch by linear warmup then cosine decay.

Kept apart from the loop so the schedule can be tested as a function and the parameter grouping
has one home: the group order (trainable backbone first, then heads + loss temperature) is what
an optimizer state in a checkpoint is indexed by, so it must not change between runs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cvgl.models.gengeo import GeoModel
from cvgl.train.config import OptimConfig


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear 0->1 over ``warmup`` steps, then cosine 1->``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: GeoModel, loss: nn.Module, config: OptimConfig) -> list[dict]:
    """Trainable backbone at ``learning_rate``; heads and the loss's temperature at ``x head_lr_scale``.

    Frozen backbone parameters are left out (AdamW would still decay them); a fully frozen
    backbone leaves one group, the heads'.
    """
    lr = config.learning_rate
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = list(model.heads.parameters()) + list(loss.parameters())
    groups = [{"params": head, "lr": lr * config.head_lr_scale}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": lr})
    return groups


def build_optimizer(model: GeoModel, loss: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, loss, config), lr=config.learning_rate, weight_decay=config.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :func:`cosine_with_warmup` over ``epochs x steps_per_epoch`` steps.

    The factor is a plain closure on purpose: ``LambdaLR`` saves no state for functions, so a
    checkpoint holds only the step count and resumes onto the schedule the config describes.
    """
    total = steps_per_epoch * config.epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return cosine_with_warmup(step, total, warmup, config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
