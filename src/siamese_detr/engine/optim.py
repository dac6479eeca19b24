"""Parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from siamese_detr.config import OptimConfig

# Deformable DETR's ``lr_linear_proj_names`` (upstream main.py): matched as substrings
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def param_groups(model: nn.Module, lr: float, lr_backbone: float, weight_decay: float,
                 lr_linear_proj_mult: float = 1.0) -> list[dict]:
    """AdamW groups as in DETR: parameters under a ``backbone.`` module get ``lr_backbone``;
    frozen parameters (``requires_grad=False``) are left out. With ``lr_linear_proj_mult !=
    1`` (Deformable DETR) a third group ``linear_proj`` holds the parameters whose name
    contains ``reference_points`` or ``sampling_offsets`` at ``lr * lr_linear_proj_mult``;
    with 1.0 there is no such group (the optimiser state keeps its two-group layout)."""
    backbone, linear_proj, rest = [], [], []
    split_proj = lr_linear_proj_mult != 1.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone.") or ".backbone." in name:
            backbone.append(p)
        elif split_proj and any(k in name for k in LINEAR_PROJ_NAMES):
            linear_proj.append(p)
        else:
            rest.append(p)
    groups = [{"params": rest, "lr": lr, "base_lr": lr, "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr_backbone, "base_lr": lr_backbone,
                       "name": "backbone"})
    if linear_proj:
        proj_lr = lr * lr_linear_proj_mult
        groups.append({"params": linear_proj, "lr": proj_lr, "base_lr": proj_lr,
                       "name": "linear_proj"})
    for g in groups:
        g["weight_decay"] = weight_decay
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; the fused kernel (one op per step for all tensors)
    when every parameter is a floating tensor on one CPU or CUDA device, else torch's
    default (foreach on CUDA). Build it after moving the model to its device."""
    groups = param_groups(model, cfg.lr, cfg.lr_backbone, cfg.weight_decay,
                          cfg.lr_linear_proj_mult)
    return torch.optim.AdamW(groups, fused=True if can_fuse(groups) else None)


def can_fuse(groups: Sequence[dict]) -> bool:
    """Can ``torch.optim.AdamW(groups, fused=True)`` take these parameter groups?"""
    params = [p for g in groups for p in g["params"]]
    return (bool(params) and len({p.device for p in params}) == 1
            and params[0].device.type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


def resolve_schedule(cfg: OptimConfig, iters_per_epoch: int) -> tuple[int, tuple[int, ...]]:
    """Total iterations and lr-drop iterations, converting epochs when ``cfg.unit == 'epoch'``."""
    scale = 1 if cfg.unit == "iter" else max(1, iters_per_epoch)
    total = max(1, int(math.ceil(cfg.length * scale)))
    drops = tuple(int(round(d * scale)) for d in cfg.lr_drops)
    return total, drops


def lr_factor(step: int, drops: Sequence[int], gamma: float, warmup_iters: int = 0) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up then step decay."""
    factor = gamma ** sum(1 for d in drops if step >= d)
    if warmup_iters > 0 and step < warmup_iters:
        factor *= (step + 1) / warmup_iters
    return factor


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * factor
