"""torch.distributed set-up from the environment torchrun or SLURM provides; rank helpers.

No launcher of our own: ``torchrun --nproc-per-node N -m siamese_detr pretrain ...`` sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; under ``srun`` the
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` variables are used, with ``MASTER_ADDR``
and ``MASTER_PORT`` exported by the batch script.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from siamese_detr.engine.env import world_from_env
from siamese_detr.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def several_processes() -> bool:
    """Is a process group of more than one process running? (The losses' CUDA graphs stay off
    then: under DDP the losses hold collectives, SyncBatchNorm and the box count.)"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``engine.device`` -> the device: ``auto`` is this process's GPU (``cuda:local_rank``)
    when CUDA is available, else the CPU; ``cuda`` without a GPU is a config error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"engine.device={requested} is not one of auto, cpu, cuda")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if requested == "cuda":
        raise ConfigError("engine.device=cuda but no CUDA device is visible; use "
                          "engine.device=auto or engine.device=cpu")
    return torch.device("cpu")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """:func:`resolve_device`, making a GPU the current CUDA device."""
    device = resolve_device(requested, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def single_process(requested: str = "auto") -> DistInfo:
    """A one-process run on the device ``engine.device`` resolves to (the demo's stages)."""
    return DistInfo(rank=0, world_size=1, local_rank=0, device=pick_device(requested))


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Initialise the default process group when the environment describes several processes."""
    rank, world, local_rank = world_from_env()
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError(
                "a multi-process run needs MASTER_ADDR and MASTER_PORT (torchrun sets them; "
                "under srun export them in the batch script)"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all processes (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
