"""The iteration-based training loop shared by pretraining and fine-tuning.

One readable function, :func:`train`. Step order: set the lr for this step, then for each
micro-batch: next batch, autocast forward, (scaled) backward with gradient sync only on the
last micro-batch; then unscale, clip, optimiser step, scaler update; then the periodic actions
written out in the loop: log every ``log_every``, checkpoint every ``ckpt_every``, evaluate
every ``eval_every``. A task is any ``nn.Module`` whose ``forward(batch)`` returns a
:class:`~siamese_detr.structures.LossOutput`; the loop knows nothing else about it.

Resume is exact: the checkpoint stores the step, model, optimiser, scaler, every RNG state and
the number of micro-batches consumed, and the caller rebuilds the data stream from there.

The loop itself reads nothing from the device between logs: loss terms are summed on the
device (:class:`LossWindow`) and read once per ``log_every`` steps, and a non-finite loss or
gradient norm is a device flag the optimiser step consumes (:func:`optimizer_step`); the
next log or checkpoint raises :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import contextlib
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
    """Move a batch (tensors, containers with ``to``, tuples/lists of them) to ``device``;
    asynchronous on CUDA (the loader pins memory), so the host does not wait."""
    if isinstance(batch, tuple | list):
        return type(batch)(move_to(b, device) for b in batch)
    if hasattr(batch, "to"):
        return batch.to(device, non_blocking=device.type == "cuda")
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


class LossWindow:
    """Loss values of the steps since the last log, summed on the device and read once.

    ``add`` costs no host read: the device terms of a :class:`LossOutput` (``raw``) and the
    total are added to a device vector, host-float terms to host lists. ``read`` makes the
    one device-to-host transfer of a logging step. ``bad`` counts, on the device, the steps
    whose loss (or gradient norm) was not finite.
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[str, ...], list[Any]] = {}  # names -> [device sum, count]
        self.weights: dict[str, float] = {}
        self.host: dict[str, list[float]] = {}
        self.bad: torch.Tensor | None = None
        self.first_step: int | None = None

    def add(self, out: LossOutput, step: int) -> torch.Tensor:
        """Record one micro-batch; returns its device flag (1.0 when the loss is not finite)."""
        total = out.total.detach().float().reshape(1)
        if out.raw is not None:
            names = ("loss", *out.names)
            values = torch.cat([total, out.raw.float()])
            self.weights.update(zip(out.names, out.weights))
        else:
            names, values = ("loss",), total
        self._add(names, values)
        for name, (weighted, raw) in out.host_terms.items():
            self.host.setdefault(name, []).append(weighted)
            self.host.setdefault(name + "_unscaled", []).append(raw)
        if self.first_step is None:
            self.first_step = step
        return self.flag(total)

    def add_value(self, name: str, value: torch.Tensor) -> None:
        self._add((name,), value.detach().float().reshape(1))

    def flag(self, value: torch.Tensor) -> torch.Tensor:
        """``1.0`` on the device when ``value`` is not finite; counted in ``bad``."""
        flag = (~torch.isfinite(value.detach())).any().float()
        self.bad = flag if self.bad is None else self.bad + flag
        return flag

    def _add(self, names: tuple[str, ...], values: torch.Tensor) -> None:
        entry = self.sums.get(names)
        if entry is None:
            self.sums[names] = [values.clone(), 1]
        else:
            entry[0] += values
            entry[1] += 1

    def read(self) -> tuple[dict[str, float], int]:
        """``(means of every term, number of non-finite steps)`` with one host transfer."""
        keys = list(self.sums)
        parts = [self.sums[k][0] for k in keys]
        if self.bad is not None:
            parts.append(self.bad.reshape(1))
        host = torch.cat(parts).cpu().tolist() if parts else []
        record: dict[str, float] = {}
        offset = 0
        for names in keys:
            count = self.sums[names][1]
            for name, value in zip(names, host[offset : offset + len(names)]):
                mean = value / count
                if name in self.weights:
                    record[name] = self.weights[name] * mean
                    record[name + "_unscaled"] = mean
                else:
                    record[name] = mean
            offset += len(names)
        for name, values in self.host.items():
            record[name] = sum(values) / len(values)
        bad = int(host[offset]) if self.bad is not None else 0
        return record, bad

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


def _raise_non_finite(record: dict[str, float], first: int | None, last: int) -> None:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "loss")
    raise NonFiniteLossError(
        f"non-finite loss between steps {first} and {last} (those steps were not applied to "
        f"the weights): loss={record.get('loss', float('nan')):.4g}; means: {terms}")


def optimizer_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Step unless ``found_inf`` (a device scalar, > 0 when the loss or gradients are not
    finite), without a host read when the optimiser can skip by itself.

    Fused Adam/AdamW/SGD take ``found_inf`` (the mechanism ``GradScaler`` uses): the kernel
    leaves parameters, moments and step counts untouched. Other optimisers need one host read
    of the flag. With an fp16 ``GradScaler``, non-finite gradients make the scaler skip.
    """
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        # the kernels skip only on exactly 1.0 (2.0 would also shift the step counts)
        optimizer.found_inf = (found_inf > 0).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(found_inf):  # one host read per step for other optimisers
        optimizer.step()


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
    window = LossWindow()
    data_times: list[float] = []
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
        if window.bad is not None and bool(window.bad):  # a checkpoint between two logs
            _raise_non_finite(window.read()[0], window.first_step, step - 1)
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
            found_inf = torch.zeros((), device=device)  # > 0: skip this step (non-finite)
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
                found = window.add(out, step)  # on the device: no host read
                found_inf = found_inf + found
                loss = out.total / engine.accum_steps
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if schedule.clip_max_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]],
                    schedule.clip_max_norm)
                window.add_value("grad_norm", grad_norm)
                found_inf = found_inf + (~torch.isfinite(grad_norm)).float()
            if dist_info.distributed:  # every rank skips together
                torch.distributed.all_reduce(found_inf)
            optimizer_step(optimizer, found_inf, scaler)
            optimizer.zero_grad(set_to_none=True)
            if hasattr(raw, "after_step"):
                raw.after_step(step)
            done = step + 1
            result.step = done
            data_times.append(t_data)
            if pbar is not None:
                pbar.update(1)
            if done % engine.log_every == 0 or done == schedule.total_steps:
                now = time.perf_counter()
                record, bad = window.read()  # the one host read of a logging step
                if bad:
                    _raise_non_finite(record, window.first_step, step)
                record["data_time"] = sum(data_times) / len(data_times)
                record = all_reduce_mean(record, device)
                record.update(step=done, lr=optimizer.param_groups[0]["lr"],
                              step_time=(now - t_last) / max(1, done - last_logged),
                              skipped_samples=skipped)
                last_logged = done
                if device.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                metrics.write(record)
                result.last_metrics = record
                if pbar is not None:
                    pbar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                window.clear()
                data_times.clear()
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
