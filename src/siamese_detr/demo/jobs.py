"""Training runs as ``siamese-detr`` subprocesses, several at a time, one thread each.

The demo's fine-tuning runs and ``bench/transfer.py`` use this: every run gets its own process
(``OMP_NUM_THREADS=1`` on CPU), so a run's numerics do not depend on how many cores the machine
has or how many runs share it, and ``min(cores, runs)`` of them train side by side. A finished
run (its ``done`` file exists) is skipped; an interrupted one continues from its ``last.pt``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from siamese_detr.config import RunConfig
from siamese_detr.configio import save_yaml
from siamese_detr.errors import UserError

__all__ = ["available_cores", "run_job"]


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_job(kind: str, cfg: RunConfig, done: str, configs: Path, threads: int | None = 1,
            mark_done: bool = False) -> Path:
    """Run ``siamese-detr KIND`` with ``cfg`` in a subprocess unless ``cfg.output_dir/done``
    exists; returns the run folder. ``done`` is a file the run writes when it finishes
    (``final_metrics.json`` of a fine-tuning run), or, with ``mark_done``, an empty file
    written here once the subprocess exits with 0 (a pretraining run writes no such file).

    The exact config is saved to ``configs/<run>.yaml`` and the subprocess's output to
    ``<run>.log`` beside the run folder. ``threads`` sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
    of the subprocess (``None``: inherit). A failed run raises :class:`UserError` naming its
    log; its checkpoint stays, so running the caller again continues it.
    """
    run_dir = Path(cfg.output_dir)
    if (run_dir / done).is_file():
        return run_dir
    cfg_path = configs / f"{run_dir.name}.yaml"
    save_yaml(cfg, cfg_path)
    cmd = [sys.executable, "-m", "siamese_detr", kind, "--preset", cfg.name, "--config",
           str(cfg_path)]
    # killed before its first checkpoint: start again (a run folder with metrics is refused)
    cmd += ["--resume", "auto"] if (run_dir / "last.pt").is_file() else ["--overwrite"]
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_suffix(".log")
    with log.open("a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc == 0 and mark_done:
        (run_dir / done).touch()
    if rc != 0 or not (run_dir / done).is_file():
        raise UserError(f"{kind} run {run_dir} failed (exit code {rc}); its output is in {log}. "
                        "Run the same command again to continue it")
    return run_dir
