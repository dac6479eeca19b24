"""The iteration-based training loop shared by pretraining and fine-tuning.

One readable function, :func:`train`. Step order: set the lr for this step, then for each
micro-batch: next batch, autocast forward, (scaled) backward with gradient sync only on the
last micro-batch; then unscale, clip, optimiser step, scaler update; then the periodic actions
written out in the loop: log every ``log_every``, checkpoint every ``ckpt_every``, evaluate
every ``eval_every``. A task is any ``nn.Module`` whose ``forward(batch)`` returns a
:class:`~siamese_detr.structures.LossOutput`; the loop knows nothing else about it.

Resume is exact: the checkpoint stores the step, model, optimiser, scaler, every RNG state and
the number of micro-batches consumed, and the caller rebuilds the data stream from there.

Faults (issue 10), each handled in one helper below:

- empty batches (every sample unusable): :func:`next_usable_batch` waits for a usable one,
  checks the stop flag in every wait and raises :class:`DataError` naming the counted skip
  reasons after ``engine.max_empty_batches`` consecutive empty batches;
- SIGTERM/SIGUSR1: checkpoint, then :class:`RunStopped` (the CLI prints the resume command and
  exits 75);
- non-finite loss: :class:`NonFinitePolicy`. The update of a step whose loss is NaN/inf is not
  applied (no backward, gradients cleared, no optimiser step), the loss terms and the batch's
  image ids are logged; after ``engine.max_nonfinite_steps`` such steps the run stops with a
  checkpoint (:class:`NonFiniteLossError`). The policy needs one host boolean per step, which
  the loop takes from the loss value it already reads for logging.
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
from siamese_detr.errors import DataError, RunStopped
from siamese_detr.structures import LossOutput


class NonFiniteLossError(RunStopped, RuntimeError):
    """Too many non-finite losses: the run stopped with a checkpoint of the last finite
    weights; the message lists every loss term and the batch's image ids."""

    exit_code = 1


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


def image_ids_of(batch: Any) -> list[Any]:
    """The image ids of a batch: ``batch.image_ids`` or the targets' ``image_id``s."""
    if hasattr(batch, "image_ids"):
        return list(batch.image_ids)
    if isinstance(batch, tuple | list) and len(batch) > 1 and isinstance(batch[1], list | tuple):
        return [getattr(t, "image_id", None) for t in batch[1]]
    return []


def next_usable_batch(stream: Iterator[Any], stop: _StopFlag, max_empty: int,
                      reasons: dict[str, int]) -> tuple[Any | None, int]:
    """The next batch holding at least one sample and the number of micro-batches consumed;
    ``None`` when a stop was requested while waiting. Skipped samples are added to
    ``reasons`` (``batch.skip_reasons``, else ``batch.skipped`` as "unusable sample")."""
    consumed = empty = 0
    while True:
        batch = next(stream)
        consumed += 1
        found = dict(getattr(batch, "skip_reasons", None) or {})
        rest = int(getattr(batch, "skipped", 0)) - sum(found.values())
        if rest > 0:
            found["unusable sample"] = found.get("unusable sample", 0) + rest
        for k, v in found.items():
            reasons[k] = reasons.get(k, 0) + v
        if batch_size_of(batch) > 0:
            return batch, consumed
        empty += 1
        if stop.set:
            return None, consumed
        if empty >= max_empty:
            counted = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(),
                                                               key=lambda kv: -kv[1]))
            raise DataError(f"no usable sample in {empty} consecutive batches (skipped so far: "
                            f"{counted or 'nothing counted'}); fix the data or the settings "
                            "that reject it (engine.max_empty_batches sets this bound)")


class NonFinitePolicy:
    """Skip the update of a step with a non-finite loss up to ``limit`` times, then stop.

    ``observe(finite, ...)`` is called once per step with one host boolean; it logs the loss
    terms and image ids of a bad step and returns whether to apply the update.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skipped: list[int] = []
        self.last_message = ""

    def observe(self, finite: bool, step: int, out: LossOutput, image_ids: list[Any]) -> bool:
        if finite:
            return True
        terms = ", ".join(f"{k}={w:.4g} (raw {r:.4g})" for k, (w, r) in out.terms.items())
        self.skipped.append(step)
        self.last_message = (f"non-finite loss at step {step}: {terms}; images {image_ids}")
        get_logger().warning("%s; update skipped (%d of at most %d)", self.last_message,
                             len(self.skipped), self.limit)
        return False

    @property
    def exhausted(self) -> bool:
        return len(self.skipped) > self.limit


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
    skip_reasons: dict[str, int] = {}
    nonfinite = NonFinitePolicy(engine.max_nonfinite_steps)
    stop_reason = ""
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
            step_position, finite = position, True
            for micro in range(engine.accum_steps):
                t0 = time.perf_counter()
                batch, consumed = next_usable_batch(stream, stop, engine.max_empty_batches,
                                                    skip_reasons)
                position += consumed
                if batch is None:  # stop requested while waiting for data: redo this step
                    break
                ids = image_ids_of(batch)
                batch = move_to(batch, device)
                t_data += time.perf_counter() - t0
                sync = micro == engine.accum_steps - 1 or not hasattr(task, "no_sync")
                ctx = contextlib.nullcontext() if sync else task.no_sync()
                with ctx, autocast_context(engine.amp, device):
                    out: LossOutput = task(batch)
                logged = out.log_dict()  # one device sync for the loss value per micro-batch
                if not math.isfinite(logged["loss"]):  # never backpropagated
                    finite = finite and nonfinite.observe(False, step, out, ids)
                    continue
                loss = out.total / engine.accum_steps
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                for k, v in logged.items():
                    window.setdefault(k, []).append(v)
            if batch is None:
                position = step_position
                log.warning("stop signal received while waiting for data: checkpoint at step "
                            "%d", step)
                save(step)
                result.stopped_early, stop_reason = True, "stop signal"
                break
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                if nonfinite.exhausted:  # the skipped step counts as done, like the others
                    save(step + 1)
                    result.step, result.stopped_early = step + 1, True
                    stop_reason = "non-finite"
                    break
            if scaler is not None and finite:
                scaler.unscale_(optimizer)
            if schedule.clip_max_norm > 0 and finite:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]],
                    schedule.clip_max_norm)
                window.setdefault("grad_norm", []).append(float(grad_norm))
            if not finite:
                pass  # the update of a non-finite step is not applied
            elif scaler is not None:
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
                if window.get("loss"):
                    pbar.set_postfix(loss=f"{window['loss'][-1]:.3f}", refresh=False)
            if done % engine.log_every == 0 or done == schedule.total_steps:
                now = time.perf_counter()
                record = {k: sum(v) / len(v) for k, v in window.items()}
                record = all_reduce_mean(record, device)
                record.update(step=done, lr=optimizer.param_groups[0]["lr"],
                              step_time=(now - t_last) / max(1, done - last_logged),
                              skipped_samples=sum(skip_reasons.values()),
                              nonfinite_steps=len(nonfinite.skipped))
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
                result.stopped_early, stop_reason = True, "stop signal"
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
    if skip_reasons:
        log.info("skipped %d unusable samples (%s)", sum(skip_reasons.values()),
                 ", ".join(f"{k}: {v}" for k, v in sorted(skip_reasons.items())))
    if stop_reason == "non-finite":
        raise NonFiniteLossError(result.step, schedule.total_steps, str(run_dir / "last.pt"),
                                 f"{len(nonfinite.skipped)} non-finite losses, more than "
                                 f"engine.max_nonfinite_steps={engine.max_nonfinite_steps}; "
                                 f"last: {nonfinite.last_message}")
    return result
