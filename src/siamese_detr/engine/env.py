"""Rank and world size from the launcher's environment (torchrun, then SLURM); no torch, so
proposal workers can use it."""

from __future__ import annotations

import os

__all__ = ["AUTO_WORKERS", "auto_num_workers", "cores_per_process", "local_world_size",
           "resolve_num_workers", "world_from_env"]

#: ``data.num_workers`` / ``pretrain.num_workers`` value meaning "one per free CPU core"
AUTO_WORKERS = -1
#: the most loader workers ``auto`` picks per training process
MAX_AUTO_WORKERS = 16


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return None


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun or SLURM variables, else ``(0, 1, 0)``."""
    world = _env_int("WORLD_SIZE")
    if world is not None:
        return _env_int("RANK") or 0, world, _env_int("LOCAL_RANK") or 0
    world = _env_int("SLURM_NTASKS")
    if world is not None and world > 1:
        return _env_int("SLURM_PROCID") or 0, world, _env_int("SLURM_LOCALID") or 0
    return 0, 1, 0


def local_world_size() -> int:
    """Training processes on this node: torchrun's ``LOCAL_WORLD_SIZE``, SLURM's
    ``SLURM_NTASKS_PER_NODE``, else 1."""
    n = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
    return max(1, n or 1)


def cores_per_process() -> int:
    """The CPU cores this process may run on (``os.sched_getaffinity``, which follows
    ``taskset`` and SLURM's CPU binding) shared by the node's training processes (at least
    1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local_world_size())


def auto_num_workers() -> int:
    """Loader workers for ``num_workers=-1``: :func:`cores_per_process`, one left for the
    training process itself, at most :data:`MAX_AUTO_WORKERS` (0 on a single core: the
    batches are then made in-process)."""
    return max(0, min(MAX_AUTO_WORKERS, cores_per_process() - 1))


def resolve_num_workers(num_workers: int) -> int:
    """A loader's ``num_workers`` setting as a worker count (``-1``: :func:`auto_num_workers`)."""
    return auto_num_workers() if num_workers == AUTO_WORKERS else num_workers
