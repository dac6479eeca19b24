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
- non-finite loss or gradient norm: :class:`NonFinitePolicy`. The update of such a step is
  not applied: the loss terms and gradient norm set a device flag that the optimiser step
  consumes (:func:`optimizer_step`; fused AdamW skips on the device, without a host read).
  The flags are read with the logged values (:class:`LossWindow`), so the policy acts at the
  next log (or checkpoint): it logs the loss terms and image ids of each bad step, and after
  ``engine.max_nonfinite_steps`` such steps the run stops with a checkpoint
  (:class:`NonFiniteLossError`).

The loop itself reads nothing from the device between logs: loss terms are summed on the
device (:class:`LossWindow`) and read once per ``log_every`` steps.

A loader that cannot keep up is named once (:class:`LoaderWatch`): from the second logging
window on, if waiting for batches took over a quarter of the step, the log says so with the
figures and the setting to raise (``loader_hint``).
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
from siamese_detr.engine.env import cores_per_process
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


def autocast_context(amp: str, device: torch.device, weight_cache: bool = True
                     ) -> contextlib.AbstractContextManager:
    """Autocast for ``engine.amp`` on CUDA (nothing on the CPU). ``weight_cache=False`` for
    CUDA graphs: a graph capture cannot use autocast's cache of cast weights."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=weight_cache)


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
    total are added to a device vector (a non-finite micro-batch adds zeros and is not
    counted, so one bad step does not turn the logged means into NaN), host-float terms to
    host lists. ``read`` makes the one device-to-host transfer of a logging step. ``bad``
    counts, on the device, the entries (micro-batches, gradient norms) that were not finite;
    :meth:`pop_bad_steps` says which steps they were (extra reads, only when ``bad > 0``).
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[str, ...], list[torch.Tensor]] = {}  # names -> [sum, count]
        self.weights: dict[str, float] = {}
        self.host: dict[str, list[float]] = {}
        self.bad: torch.Tensor | None = None
        # (step, image ids, names, values, flag) of every entry since the last log
        self.entries: list[tuple[int, list[Any], tuple[str, ...], torch.Tensor,
                                 torch.Tensor, dict[str, tuple[float, float]]]] = []

    def add(self, out: LossOutput, step: int, image_ids: list[Any] | None = None
            ) -> torch.Tensor:
        """Record one micro-batch; returns its device flag (1.0 when a term is not finite)."""
        total = out.total.detach().float().reshape(1)
        if out.raw is not None:
            names = ("loss", *out.names)
            values = torch.cat([total, out.raw.float()])
            self.weights.update(zip(out.names, out.weights))
        else:
            names, values = ("loss",), total
        flag = self._add(names, values, step, image_ids or [], out.host_terms)
        for name, (weighted, raw) in out.host_terms.items():
            self.host.setdefault(name, []).append(weighted)
            self.host.setdefault(name + "_unscaled", []).append(raw)
        return flag

    def add_value(self, name: str, value: torch.Tensor, step: int) -> torch.Tensor:
        """Record one more device value (e.g. the gradient norm); returns its flag."""
        return self._add((name,), value.detach().float().reshape(1), step, [])

    def _add(self, names: tuple[str, ...], values: torch.Tensor, step: int,
             image_ids: list[Any], host_terms: dict[str, tuple[float, float]] | None = None
             ) -> torch.Tensor:
        flag = (~torch.isfinite(values)).any().float()
        self.bad = flag if self.bad is None else self.bad + flag
        self.entries.append((step, image_ids, names, values, flag, host_terms or {}))
        good = (1.0 - flag).reshape(1)
        kept = torch.where(flag > 0, torch.zeros_like(values), values)
        entry = self.sums.get(names)
        if entry is None:
            self.sums[names] = [kept, good]
        else:
            entry[0] = entry[0] + kept
            entry[1] = entry[1] + good
        return flag

    def read(self) -> tuple[dict[str, float], int]:
        """``(means of every term over its finite entries, number of non-finite entries)``
        with one host transfer."""
        keys = list(self.sums)
        parts = [t for k in keys for t in self.sums[k]]
        if self.bad is not None:
            parts.append(self.bad.reshape(1))
        host = torch.cat(parts).cpu().tolist() if parts else []
        record: dict[str, float] = {}
        offset = 0
        for names in keys:
            count = host[offset + len(names)]
            for name, value in zip(names, host[offset : offset + len(names)]):
                mean = value / count if count > 0 else float("nan")
                if name in self.weights:
                    record[name] = self.weights[name] * mean
                    record[name + "_unscaled"] = mean
                else:
                    record[name] = mean
            offset += len(names) + 1
        for name, values in self.host.items():
            record[name] = sum(values) / len(values)
        bad = int(host[offset]) if self.bad is not None else 0
        return record, bad

    def pending_bad(self) -> int:
        """Non-finite entries not yet handled (one host read: for a checkpoint between logs)."""
        return int(self.bad) if self.bad is not None else 0

    def pop_bad_steps(self) -> list[tuple[int, list[Any], dict[str, tuple[float, float]]]]:
        """``(step, image ids, {name: (weighted, raw)})`` of every step with a non-finite entry,
        in step order; forgets the entries (they are reported once)."""
        if not self.entries:
            return []
        flags = torch.stack([e[4] for e in self.entries]).cpu().tolist()
        bad_steps = sorted({e[0] for e, f in zip(self.entries, flags) if f > 0})
        steps = []
        for step in bad_steps:
            mine = [e for e in self.entries if e[0] == step]
            ids = [i for e in mine for i in e[1]]
            values = torch.cat([e[3] for e in mine]).cpu().tolist()
            names = [n for e in mine for n in e[2]]
            terms = {n: (self.weights.get(n, 1.0) * v, v) for n, v in zip(names, values)}
            for e in mine:
                terms.update(e[5])
            steps.append((step, ids, terms))
        self.entries.clear()
        self.bad = None
        return steps

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


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

    ``observe(False, step, terms, ids)`` is called for each bad step when the loop reads its
    flags (at a log or checkpoint); it logs the loss terms and image ids of the step. The
    update itself was already skipped on the device (:func:`optimizer_step`).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skipped: list[int] = []
        self.last_message = ""

    def observe(self, finite: bool, step: int, terms: dict[str, tuple[float, float]],
                image_ids: list[Any]) -> bool:
        if finite:
            return True
        shown = {k: v for k, v in terms.items() if k != "loss" or len(terms) == 1}
        terms_text = ", ".join(f"{k}={w:.4g} (raw {r:.4g})" for k, (w, r) in shown.items())
        self.skipped.append(step)
        self.last_message = (f"non-finite loss at step {step}: {terms_text}; images "
                             f"{image_ids}")
        get_logger().warning("%s; update skipped (%d of at most %d)", self.last_message,
                             len(self.skipped), self.limit)
        return False

    @property
    def exhausted(self) -> bool:
        return len(self.skipped) > self.limit


class LoaderWatch:
    """Warns once when the training waits for its data: at a log, the mean time per step
    spent getting the next batch (``data_time``) against the mean step time. The first
    logging window is left out (worker start-up, first batches, graph captures).

    Args:
        hint: the setting to raise and its value, e.g. ``"pretrain.num_workers=4"``.
        share: warn above this share of the step spent waiting.
    """

    def __init__(self, hint: str = "", share: float = 0.25) -> None:
        self.hint = hint
        self.share = share
        self.windows = 0
        self.warned = False

    def message(self, data_time: float, step_time: float, steps: str) -> str | None:
        """The warning for one logging window, or None (first window, below the share,
        already warned)."""
        self.windows += 1
        if self.warned or self.windows == 1 or step_time <= 0 \
                or data_time <= self.share * step_time:
            return None
        self.warned = True
        per_process = cores_per_process()
        what = f"raise {self.hint}" if self.hint else "raise the loader's num_workers"
        return (f"the loader is the limit: waiting for data took {data_time / step_time:.0%} "
                f"of each step ({data_time * 1e3:.0f} of {step_time * 1e3:.0f} ms, steps "
                f"{steps}); {what} (this machine has {per_process} CPU cores per training "
                "process)")


class _GraphCounts:
    """``engine.cuda_graphs`` in the log: graphs held and the share of the steps since the
    last log that ran from a graph (nothing when the task has no graphs); for a second
    graphed part, the losses (Siamese DETR, fine-tuning), ``losses_graphed_share`` too."""

    def __init__(self, dense: Any, losses: Any = None) -> None:
        self.parts = [(p, part) for p, part in (("", dense), ("losses_", losses))
                      if part is not None]
        self.last = {p: (0, 0) for p, _ in self.parts}

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix, part in self.parts:
            stats = part.stats()
            graphed, eager = stats["graphed_calls"], stats["eager_calls"]
            g, e = graphed - self.last[prefix][0], eager - self.last[prefix][1]
            self.last[prefix] = (graphed, eager)
            if not prefix:
                out["cuda_graphs"] = float(stats["graphs"])
            if g + e or not prefix:
                out[f"{prefix}graphed_share"] = g / (g + e) if g + e else 0.0
        return out


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
    loader_hint: str = "",
) -> TrainResult:
    """Run ``schedule.total_steps`` optimiser steps of ``task`` (possibly DDP-wrapped).

    Args:
        task: module whose ``forward(batch) -> LossOutput``.
        batches: ``batches(position)`` returns the data stream starting after ``position``
            micro-batches (so a resumed run sees exactly the batches it would have seen).
        checkpoint_meta: stored in every checkpoint (``kind``, ``config`` dict, ...).
        state_dict_of: what goes under ``"model"`` (default: the unwrapped task's state dict).
        loader_hint: the loader setting to raise when the training waits for data
            (:class:`LoaderWatch`), e.g. ``"pretrain.num_workers=4"``.
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

    def too_many_nonfinite(bad: int) -> bool:
        """Hand the steps behind ``bad`` non-finite entries to the policy (their updates were
        already skipped on the device); True when the run must stop."""
        if bad:
            for bad_step, ids, terms in window.pop_bad_steps():
                nonfinite.observe(False, bad_step, terms, ids)
        return nonfinite.exhausted

    graph_counts = _GraphCounts(getattr(raw, "_dense", None), getattr(raw, "_losses", None))
    loader_watch = LoaderWatch(loader_hint)
    task.train()
    with _StopFlag() as stop:
        for step in range(start.step, schedule.total_steps):
            factor = lr_factor(step, schedule.lr_drops, schedule.gamma, schedule.warmup_iters)
            set_lr(optimizer, factor)
            t_data = 0.0
            step_position = position
            found_inf = torch.zeros((), device=device)  # > 0: skip this step (non-finite)
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
                with ctx, autocast_context(engine.amp, device, not engine.cuda_graphs):
                    out: LossOutput = task(batch)
                found_inf = found_inf + window.add(out, step, ids)  # on the device
                loss = out.total / engine.accum_steps
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            if batch is None:
                position = step_position
                optimizer.zero_grad(set_to_none=True)
                log.warning("stop signal received while waiting for data: checkpoint at step "
                            "%d", step)
                save(step)
                result.stopped_early, stop_reason = True, "stop signal"
                break
            if scaler is not None:
                scaler.unscale_(optimizer)
            if schedule.clip_max_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]],
                    schedule.clip_max_norm)
                found_inf = found_inf + window.add_value("grad_norm", grad_norm, step)
            if dist_info.distributed:  # every rank skips together
                torch.distributed.all_reduce(found_inf)
            optimizer_step(optimizer, found_inf, scaler)  # a non-finite step is not applied
            optimizer.zero_grad(set_to_none=True)
            if hasattr(raw, "after_step"):
                raw.after_step(step)
            done = step + 1
            result.step = done
            data_times.append(t_data)
            if pbar is not None:
                pbar.update(1)
            must_stop = False
            if done % engine.log_every == 0 or done == schedule.total_steps:
                now = time.perf_counter()
                record, bad = window.read()  # the one host read of a logging step
                must_stop = too_many_nonfinite(bad)
                record["data_time"] = sum(data_times) / len(data_times)
                record = all_reduce_mean(record, device)
                record.update(step=done, lr=optimizer.param_groups[0]["lr"],
                              step_time=(now - t_last) / max(1, done - last_logged),
                              skipped_samples=sum(skip_reasons.values()),
                              nonfinite_steps=len(nonfinite.skipped))
                last_logged = done
                if device.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                record.update(graph_counts.read())
                slow = loader_watch.message(record["data_time"], record["step_time"],
                                            f"{done - len(data_times) + 1}-{done}")
                if slow and dist_info.is_main:
                    log.warning("%s", slow)
                metrics.write(record)
                result.last_metrics = record
                if pbar is not None:
                    pbar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                window.clear()
                data_times.clear()
                t_last = now
            elif engine.ckpt_every > 0 and done % engine.ckpt_every == 0:
                must_stop = too_many_nonfinite(window.pending_bad())  # between two logs
            if must_stop:  # the skipped steps count as done, like the others
                save(done)
                result.stopped_early, stop_reason = True, "non-finite"
                break
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
