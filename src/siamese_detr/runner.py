"""``run(cfg)``: build the task the config names and train it with the shared engine.

One runner for every training task (fine-tuning, Siamese DETR pretraining, and the pretext
tasks to come): seed, data set, module, optimiser / schedule / resume / DDP
(:func:`~siamese_detr.engine.setup.prepare_training`), one start-up log line, the loader
stream, :func:`~siamese_detr.engine.loop.train`, then the task's ``finish``. What differs
between tasks is the :class:`~siamese_detr.methods.base.Task` object ``build_task`` returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siamese_detr.config import RunConfig
from siamese_detr.errors import ConfigError, RunStopped

if TYPE_CHECKING:
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.methods.base import Task

__all__ = ["build_task", "run"]


def build_task(cfg: RunConfig, device: Any = "cpu") -> Task:
    """The task ``cfg`` names: ``task=finetune`` or ``task=pretrain`` + ``pretrain.method``."""
    if cfg.task == "finetune":
        from siamese_detr.methods.supervised import SupervisedTask

        return SupervisedTask(cfg, device)
    match cfg.pretrain.method:
        case "siamese":
            from siamese_detr.methods.siamese.task import SiameseTask

            return SiameseTask(cfg)
        case "updetr":
            from siamese_detr.methods.updetr.task import UPDETRTask

            return UPDETRTask(cfg)
        case "detreg":
            from siamese_detr.methods.detreg.task import DETRegTask

            return DETRegTask(cfg)
        case _:
            raise ConfigError(f"unknown pretrain.method={cfg.pretrain.method}")


def run(cfg: RunConfig, dist_info: DistInfo | None = None, resume: str | None = None
        ) -> dict[str, float]:
    """Train ``cfg`` and return its metrics (fine-tuning: the final evaluation; pretraining:
    the last logged losses).

    Args:
        cfg: a validated RunConfig (``get_preset`` + overrides).
        dist_info: from :func:`~siamese_detr.engine.distributed.init_distributed`; when
            ``None``, ``run`` initialises torch.distributed (torchrun / SLURM environment or
            one process) and the package logging itself, and cleans up afterwards.
        resume: a checkpoint to continue exactly from; ``"auto"`` = ``OUTPUT_DIR/last.pt``.
    """
    from siamese_detr.engine.distributed import cleanup, init_distributed
    from siamese_detr.engine.logging import setup_logging

    run_dir = Path(cfg.output_dir)
    resume_path = str(run_dir / "last.pt") if resume == "auto" else resume
    if dist_info is not None:
        return _train(cfg, dist_info, resume_path)
    info = init_distributed(cfg.engine.device)
    setup_logging(info.is_main, run_dir / "log.txt")
    try:
        return _train(cfg, info, resume_path)
    finally:
        cleanup()


def check_backbone_weights(cfg: RunConfig) -> None:
    """A frozen backbone without weights is random: it trains without error but the
    features do not transfer. Error for the paper pretraining presets, a warning otherwise;
    ``model.backbone.weights=random`` says it is intended."""
    from siamese_detr.engine.logging import get_logger

    b = cfg.model.backbone
    if b.weights or b.freeze == "none":
        return
    what = ("model.backbone.weights is empty: the frozen backbone ("
            f"{'all' if b.freeze == 'all' else b.freeze}) is randomly initialised and "
            "pretraining on random features does not transfer; set model.backbone.weights="
            "PATH (SwAV / torchvision ResNet file, see the README) or "
            "model.backbone.weights=random if that is intended")
    if cfg.task == "pretrain" and not cfg.name.startswith("tiny/"):
        raise ConfigError(f"preset {cfg.name}: {what}")
    get_logger().warning("%s", what)


def _train(cfg: RunConfig, dist_info: DistInfo, resume_path: str | None) -> dict[str, float]:
    import torch

    from siamese_detr.configio import to_dict
    from siamese_detr.data.loaders import build_detection_loader
    from siamese_detr.engine.batching import apply_global_batch
    from siamese_detr.engine.env import AUTO_WORKERS, resolve_num_workers
    from siamese_detr.engine.logging import get_logger
    from siamese_detr.engine.loop import train
    from siamese_detr.engine.setup import prepare_training

    # pretrain.global_batch / data.global_batch -> engine.accum_steps for this world size
    cfg, batch_plan = apply_global_batch(cfg, dist_info.world_size)
    get_logger().info("%s", batch_plan.describe())
    run_dir = Path(cfg.output_dir)
    check_backbone_weights(cfg)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, dist_info.device)
    dataset = task.build_dataset()
    module = task.build_module().to(dist_info.device)
    prep = prepare_training(module, cfg, dist_info, len(dataset), task.batch_size, resume_path,
                            sync_bn=task.sync_bn)
    get_logger().info("%s", task.describe(len(dataset), prep))
    extra = {} if task.collate is None else {"collate_fn": task.collate}
    # optional Task hook: more checkpoint entries (fine-tuning stores its category names)
    extras = getattr(task, "checkpoint_extras", dict)

    section = "pretrain" if task.kind == "pretrain" else "data"
    workers = resolve_num_workers(task.num_workers)
    if task.num_workers == AUTO_WORKERS:
        get_logger().info("%s.num_workers=-1 (auto): %d loader workers", section, workers)

    def batches(position: int) -> Iterator[Any]:
        return build_detection_loader(dataset, task.batch_size, workers, cfg.seed,
                                      start_step=position,
                                      pin_memory=dist_info.device.type == "cuda", **extra)

    result = train(
        task=prep.model, batches=batches, optimizer=prep.optimizer, schedule=prep.schedule,
        engine=cfg.engine, run_dir=run_dir, dist_info=dist_info,
        checkpoint_meta={"kind": task.kind, "config": to_dict(cfg), **extras()},
        start=prep.start, scaler=prep.scaler, evaluate=task.make_evaluator(run_dir),
        loader_hint=f"{section}.num_workers={workers}",
    )
    if result.stopped_early:  # a signal: the run is not finished, say so (CLI exit 75)
        raise RunStopped(result.step, prep.schedule.total_steps, str(run_dir / "last.pt"),
                         "stop signal")
    return task.finish(result, dist_info)
