"""The effective global batch: per-process batch x world size x gradient accumulation.

The paper schedules (300k / 120k iterations) assume a fixed number of images per optimiser
step (256 on ImageNet, 64 on COCO). ``pretrain.global_batch`` / ``data.global_batch`` fix that
number; the accumulation steps are then derived from the world size and the per-process
batch, so the same preset gives the same schedule on 8 GPUs or on 64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from siamese_detr.config import RunConfig
from siamese_detr.errors import ConfigError

__all__ = ["BatchPlan", "apply_global_batch", "plan_batch"]


@dataclass(frozen=True)
class BatchPlan:
    per_process: int
    world_size: int
    accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.per_process * self.world_size * self.accum_steps

    def describe(self) -> str:
        """The start-up line: ``effective global batch 256 = 8 per process x 8 processes x 4
        accumulation steps``."""
        return (f"effective global batch {self.global_batch} = {self.per_process} per process x "
                f"{self.world_size} process{'es' if self.world_size != 1 else ''} x "
                f"{self.accum_steps} accumulation step{'s' if self.accum_steps != 1 else ''}")


def _keys(cfg: RunConfig) -> tuple[str, int, int]:
    """(config prefix, per-process batch, requested global batch) of ``cfg.task``."""
    if cfg.task == "pretrain":
        return "pretrain", cfg.pretrain.batch_size, cfg.pretrain.global_batch
    return "data", cfg.data.batch_size, cfg.data.global_batch


def plan_batch(cfg: RunConfig, world_size: int) -> BatchPlan:
    """The batch plan of ``cfg`` on ``world_size`` processes.

    Without a global batch (``0``) the accumulation is ``engine.accum_steps``. With one, the
    accumulation is ``global_batch / (batch_size * world_size)``.

    Raises:
        ConfigError: the global batch is not a multiple of ``batch_size * world_size``.
    """
    prefix, per_process, wanted = _keys(cfg)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if wanted == 0:
        return BatchPlan(per_process, world_size, cfg.engine.accum_steps)
    per_step = per_process * world_size
    if wanted % per_step != 0:
        fits = [b for b in range(1, wanted + 1) if wanted % (b * world_size) == 0]
        hint = (f"set {prefix}.batch_size to one of {fits[-4:]}" if fits
                else f"use a world size that divides {wanted}")
        raise ConfigError(
            f"{prefix}.global_batch={wanted} is not a multiple of {prefix}.batch_size="
            f"{per_process} x {world_size} process(es) = {per_step}: {hint}, or change "
            f"{prefix}.global_batch"
        )
    return BatchPlan(per_process, world_size, wanted // per_step)


def apply_global_batch(cfg: RunConfig, world_size: int) -> tuple[RunConfig, BatchPlan]:
    """``cfg`` with ``engine.accum_steps`` set from the global batch (unchanged without one),
    and its :class:`BatchPlan`."""
    plan = plan_batch(cfg, world_size)
    if plan.accum_steps != cfg.engine.accum_steps:
        cfg = replace(cfg, engine=replace(cfg.engine, accum_steps=plan.accum_steps))
    return cfg, plan
