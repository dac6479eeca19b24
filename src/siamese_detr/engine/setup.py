"""What every training run does before the loop: optimiser, schedule, scaler, resume, DDP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from siamese_detr.config import RunConfig
from siamese_detr.configio import save_yaml
from siamese_detr.engine.distributed import DistInfo
from siamese_detr.engine.logging import get_logger
from siamese_detr.engine.loop import ResumeState, Schedule, resume
from siamese_detr.engine.optim import build_optimizer, resolve_schedule


def tidy_resumed_run(run_dir: Path, step: int) -> None:
    """Before a resumed run goes on from ``step``: delete the temporary files a kill during a
    checkpoint write left, and drop the ``metrics.jsonl`` records of the steps after ``step``
    (they are replayed, and would otherwise be there twice)."""
    import json

    from siamese_detr.files import remove_stale_temporaries, write_text

    for tmp in remove_stale_temporaries(run_dir):
        get_logger().info("removed %s (left by an interrupted write)", tmp.name)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text(metrics, "".join(f"{line}\n" for line in kept))


def _enable_cuda_graphs(task: nn.Module, cfg: RunConfig, dist_info: DistInfo) -> None:
    """``engine.cuda_graphs``: on CUDA, the task's dense part from CUDA graphs
    (:mod:`siamese_detr.engine.graphs`); ignored on the CPU, like ``engine.amp``."""
    from siamese_detr.engine.graphs import GraphableTask, enable_cuda_graphs

    log = get_logger()
    if dist_info.device.type != "cuda":
        log.warning("engine.cuda_graphs=true is ignored on %s (CUDA only)", dist_info.device)
        return
    names = enable_cuda_graphs(task, cfg.engine.cuda_graphs_max, cfg.engine.pad_to_multiple,
                               shared_pool=cfg.engine.cuda_graphs_pool == "shared")
    if names:
        pads = sorted({m.pad_multiple for m in task.modules() if isinstance(m, GraphableTask)})
        log.info("cuda_graphs: %s (batches padded to multiples of %s, at most %d graphs, "
                 "memory pool: %s)", ", ".join(names), "/".join(map(str, pads)),
                 cfg.engine.cuda_graphs_max, cfg.engine.cuda_graphs_pool)
    else:
        log.warning("engine.cuda_graphs=true: this task (%s) has no graphed part yet; it "
                    "runs eagerly", type(task).__name__)


def use_deterministic_algorithms(task: nn.Module, device: torch.device) -> None:
    """``engine.deterministic``: PyTorch's deterministic algorithms (warn-only: an op without
    one warns instead of stopping a run), cuDNN deterministic and not benchmarking, and the
    fixed cuBLAS workspace they need (set here unless the environment sets it; it takes
    effect if cuBLAS has not started yet). cuDNN's fused convolutions
    (``model.backbone.fused_conv_relu``) check the flag and stay off."""
    import os

    from siamese_detr.ops.deform_attn import MSDeformAttn

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    deformable = any(isinstance(m, MSDeformAttn) for m in task.modules())
    if deformable and device.type == "cuda":
        get_logger().warning(
            "engine.deterministic=true: the deformable attention backward adds its value "
            "gradients with atomics (as the upstream CUDA kernel and grid_sample do), so "
            "Deformable DETR runs are not bit-reproducible on a GPU")


@dataclass
class Prepared:
    model: nn.Module  # the task, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler | None
    start: ResumeState | None
    global_batch: int


def prepare_training(task: nn.Module, cfg: RunConfig, dist_info: DistInfo, dataset_len: int,
                     per_process_batch: int, resume_path: str | None = None,
                     sync_bn: bool = False) -> Prepared:
    """Build the optimiser and schedule (epochs resolved with the global batch), restore a
    checkpoint when ``resume_path`` is given, write ``config.yaml`` and wrap in DDP."""
    global_batch = per_process_batch * dist_info.world_size * cfg.engine.accum_steps
    total, drops = resolve_schedule(cfg.optim, math.ceil(dataset_len / global_batch))
    if cfg.engine.compile:
        from siamese_detr.engine.compile import compile_transformers

        get_logger().info("torch.compile: %s", ", ".join(compile_transformers(task)))
    if cfg.engine.cudnn_benchmark and dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.engine.deterministic:
        use_deterministic_algorithms(task, dist_info.device)
    if cfg.engine.cuda_graphs:
        _enable_cuda_graphs(task, cfg, dist_info)
        if cfg.engine.compile and dist_info.device.type == "cuda":
            get_logger().warning("engine.compile with engine.cuda_graphs: the compiled "
                                 "transformer is captured in the graphs; this combination has "
                                 "not been checked on a GPU yet (docs/benchmarks.md)")
    if cfg.engine.pad_to_multiple > 1:  # explicit: applies with or without graphs
        from siamese_detr.engine.graphs import GraphableTask

        padded = [m for m in task.modules() if isinstance(m, GraphableTask)]
        for m in padded:
            m.pad_multiple = cfg.engine.pad_to_multiple
        if not padded:
            get_logger().warning("engine.pad_to_multiple: this task (%s) pads per batch only",
                                 type(task).__name__)
    optimizer = build_optimizer(task, cfg.optim)
    scaler = None
    if cfg.engine.amp == "fp16" and dist_info.device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    start = None
    if resume_path:
        start = resume(resume_path, task, optimizer, scaler)
        get_logger().info("resumed from %s at step %d", resume_path, start.step)
    if dist_info.is_main:
        if start is not None:
            tidy_resumed_run(Path(cfg.output_dir), start.step)
        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
    model = task
    if dist_info.distributed:
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    schedule = Schedule(total, drops, cfg.optim.gamma, cfg.optim.warmup_iters,
                        cfg.optim.clip_max_norm)
    return Prepared(model, optimizer, schedule, scaler, start, global_batch)
