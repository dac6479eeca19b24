"""The iteration-based training loop shared by pretraining and fine-tuning.

One readable function, :func:`train`. Step order: set the lr for this step, then for each
micro-batch: next batch, autocast forward, (scaled) backward with gradient sync only on the
last micro-batch; then unscale, clip, optimiser step, scaler update; then the periodic actions
written out in the loop: log every ``log_every``, checkpoint every ``ckpt_every``, evaluate
every ``eval_every``. A task is any ``nn.Module`` whose ``forward(batch)`` returns a
:class:`~siamese_detr.structures.LossOutput`; the loop knows nothing else about it.

Resume is exact: the checkpoint stores the step, model, optimiser, scaler, every RNG state and
the number of micro-batches consumed, and the caller rebuilds the data stream from there.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siamese_detr.config import EngineConfig
from siamese_detr.engine.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    rotate_checkpoints,
    save_checkpoint,
)
from siamese_detr.engine.distributed import DistInfo, all_reduce_mean
from siamese_detr.engine.logging import MetricsWriter, get_logger
from siamese_detr.engine.optim import lr_factor, set_lr
from siamese_detr.structures import LossOutput


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message lists every term."""


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    lr_drops: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_iters: int = 0
    clip_max_norm: float = 0.0


@dataclass
class TrainResult:
    step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


@dataclass
class ResumeState:
    step: int = 0
    data_position: int = 0  # micro-batches consumed from the data stream


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: ``len(batch)``, or of its first element for tuples."""
    if isinstance(batch, tuple | list):
        return len(batch[0])
    return len(batch)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, tuple | list):
        return type(batch)(move_to(b, device) for b in batch)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def resume(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler | None) -> ResumeState:
    """Restore everything a checkpoint holds into live objects; return where to continue."""
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        restore_rng(ckpt["rng"])
    return ResumeState(step=int(ckpt["step"]), data_position=int(ckpt.get("data_position", 0)))


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM pre-emption): checkpoint after the current step, exit."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is None:
                continue
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_finite(value: float, out: LossOutput, step: int) -> None:
    if not math.isfinite(value):
        terms = ", ".join(f"{k}={w:.4g} (raw {r:.4g})" for k, (w, r) in out.terms.items())
        raise NonFiniteLossError(f"non-finite loss at step {step}: {terms}")


def train(
    *,
    task: nn.Module,
    batches: Callable[[int], Iterator[Any]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    engine: EngineConfig,
    run_dir: Path,
    dist_info: DistInfo,
    checkpoint_meta: dict[str, Any],
    start: ResumeState | None = None,
    scaler: torch.amp.GradScaler | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    state_dict_of: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> TrainResult:
    """Run ``schedule.total_steps`` optimiser steps of ``task`` (possibly DDP-wrapped).

    Args:
        task: module whose ``forward(batch) -> LossOutput``.
        batches: ``batches(position)`` returns the data stream starting after ``position``
            micro-batches (so a resumed run sees exactly the batches it would have seen).
        checkpoint_meta: stored in every checkpoint (``kind``, ``config`` dict, ...).
        state_dict_of: what goes under ``"model"`` (default: the unwrapped task's state dict).
    """
    log = get_logger()
    start = start or ResumeState()
    device = dist_info.device
    raw = task.module if hasattr(task, "module") else task
    state_dict_of = state_dict_of or raw.state_dict
    metrics = MetricsWriter(run_dir / "metrics.jsonl", engine.tensorboard, dist_info.is_main)
    position = start.data_position
    stream = batches(position)
    result = TrainResult(step=start.step)
    window: dict[str, list[float]] = {}
    skipped = 0
    last_logged = start.step
    t_last = time.perf_counter()
    pbar = None
    if engine.progress and dist_info.is_main:
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        pbar = tqdm(total=schedule.total_steps, initial=start.step, desc=checkpoint_meta.get(
            "kind", "train"), dynamic_ncols=True, leave=False,
            mininterval=0.5 if interactive else 30.0)  # keep redirected logs small

    def save(step: int) -> None:
        if not dist_info.is_main:
            return
        payload = {**checkpoint_meta, "step": step, "data_position": position,
                   "model": state_dict_of(), "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict() if scaler is not None else {},
                   "rng": capture_rng()}
        save_checkpoint(payload, run_dir / "last.pt")
        if engine.keep_checkpoints > 0 and step < schedule.total_steps:
            save_checkpoint(payload, run_dir / f"step_{step}.pt")
            rotate_checkpoints(run_dir, engine.keep_checkpoints)

    task.train()
    with _StopFlag() as stop:
        for step in range(start.step, schedule.total_steps):
            factor = lr_factor(step, schedule.lr_drops, schedule.gamma, schedule.warmup_iters)
            set_lr(optimizer, factor)
            t_data = 0.0
            for micro in range(engine.accum_steps):
                t0 = time.perf_counter()
                batch = next(stream)
                position += 1
                while batch_size_of(batch) == 0:  # every sample of the batch was unusable
                    skipped += 1
                    batch = next(stream)
                    position += 1
                skipped += int(getattr(batch, "skipped", 0))
                batch = move_to(batch, device)
                t_data += time.perf_counter() - t0
                sync = micro == engine.accum_steps - 1 or not hasattr(task, "no_sync")
                ctx = contextlib.nullcontext() if sync else task.no_sync()
                with ctx, autocast_context(engine.amp, device):
                    out: LossOutput = task(batch)
                logged = out.log_dict()  # one device sync for the loss value per micro-batch
                _check_finite(logged["loss"], out, step)
                loss = out.total / engine.accum_steps
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                for k, v in logged.items():
                    window.setdefault(k, []).append(v)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if schedule.clip_max_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]],
                    schedule.clip_max_norm)
                window.setdefault("grad_norm", []).append(float(grad_norm))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(raw, "after_step"):
                raw.after_step(step)
            done = step + 1
            result.step = done
            window.setdefault("data_time", []).append(t_data)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{window['loss'][-1]:.3f}", refresh=False)
            if done % engine.log_every == 0 or done == schedule.total_steps:
                now = time.perf_counter()
                record = {k: sum(v) / len(v) for k, v in window.items()}
                record = all_reduce_mean(record, device)
                record.update(step=done, lr=optimizer.param_groups[0]["lr"],
                              step_time=(now - t_last) / max(1, done - last_logged),
                              skipped_samples=skipped)
                last_logged = done
                if device.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                metrics.write(record)
                result.last_metrics = record
                window.clear()
                t_last = now
            if engine.ckpt_every > 0 and done % engine.ckpt_every == 0:
                save(done)
            if evaluate is not None and engine.eval_every > 0 and done % engine.eval_every == 0 \
                    and done < schedule.total_steps:
                result.eval_metrics = evaluate(raw)
                metrics.write({"step": done, **{f"eval/{k}": v for k, v in
                                                result.eval_metrics.items()}})
                task.train()
            if stop.set:
                log.warning("stop signal received: checkpoint at step %d, exiting", done)
                save(done)
                result.stopped_early = True
                break
    if pbar is not None:
        pbar.close()
    if not result.stopped_early:
        save(result.step)
        if evaluate is not None:
            result.eval_metrics = evaluate(raw)
            metrics.write({"step": result.step, **{f"eval/{k}": v for k, v in
                                                   result.eval_metrics.items()}})
    metrics.close()
    if skipped:
        log.info("skipped %d unusable samples (corrupt image or no region)", skipped)
    return result
