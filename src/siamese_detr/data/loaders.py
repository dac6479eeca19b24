"""Samplers and loaders with exact, worker-count-independent resume.

Training streams are endless (:class:`InfiniteSampler`); the loop counts iterations. Each
sample's augmentation randomness is a pure function of ``(seed, rank, position of the sample in
this rank's stream)``: :class:`PositionedSampler` yields ``(index, position)`` pairs and
:class:`SeededSamples` seeds Python's ``random``, NumPy's and torch's global RNGs from them
around the call of the wrapped data set (restoring the previous states afterwards). Hence
``build_detection_loader(..., start_step=k)`` yields exactly the batches ``k, k+1, ...`` of the
uninterrupted stream, bit for bit, with any ``num_workers``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from siamese_detr.data.collate import collate_detection

__all__ = [
    "InfiniteSampler",
    "PositionedSampler",
    "SeededSamples",
    "ShardSampler",
    "sample_seed",
    "build_detection_loader",
    "build_eval_loader",
]


class InfiniteSampler(Sampler[int]):
    """Endless stream of data set indices for one rank.

    Pass ``p`` is ``torch.randperm(size)`` drawn from a ``torch.Generator`` seeded with
    ``seed + p`` (``arange`` when ``shuffle=False``); this rank takes entries
    ``rank::world_size`` of each pass, so ranks are disjoint and together cover every pass.
    ``start=k`` skips the first ``k`` indices of this rank's stream without loading anything
    (whole passes are skipped arithmetically).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, start: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"InfiniteSampler needs a non-empty data set (size={size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if size < world_size:
            raise ValueError(f"data set of {size} samples is smaller than world_size "
                             f"{world_size}; every rank needs at least one sample")
        if start < 0:
            raise ValueError(f"start must be >= 0 (got {start})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_pass = len(range(rank, size, world_size))

    def pass_indices(self, pass_index: int) -> list[int]:
        """The indices this rank takes in pass ``pass_index``."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + pass_index)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        pass_index, offset = divmod(self.start, self.per_pass)
        while True:
            yield from self.pass_indices(pass_index)[offset:]
            offset = 0
            pass_index += 1


class PositionedSampler(Sampler[tuple[int, int]]):
    """Wraps an index sampler: yields ``(index, position)`` where ``position`` counts samples
    of this stream from ``start`` (the number of indices the wrapped sampler skipped)."""

    def __init__(self, sampler: Sampler[int], start: int = 0) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos, index in enumerate(self.sampler, start=self.start):
            yield index, pos


def sample_seed(seed: int, rank: int, position: int) -> int:
    """A 63-bit seed that depends only on ``(seed, rank, position)``."""
    seq = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, rank, position])
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


class SeededSamples(Dataset):
    """``self[(index, position)]`` returns ``dataset[index]`` computed with Python ``random``,
    NumPy and torch (CPU) global RNGs seeded by :func:`sample_seed` ``(seed, rank, position)``.
    The previous RNG states are restored afterwards, so the caller's randomness is untouched.

    A data set whose class sets ``accepts_position = True`` (one that draws its own randomness
    from the stream position, e.g. the pretraining views) is called as
    ``dataset[(index, position)]`` instead of ``dataset[index]``.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, position = key
        s = sample_seed(self.seed, self.rank, position)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), (
            torch.random.get_rng_state()
        )
        try:
            random.seed(s)
            np.random.seed(s % (2**32))
            # the CPU generator only: the same stream as torch.manual_seed(s) for data work,
            # 25x cheaper per sample (no accelerator generators to seed)
            torch.default_generator.manual_seed(s)
            if getattr(self.dataset, "accepts_position", False):
                return self.dataset[(index, position)]  # type: ignore[index]
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.random.set_rng_state(torch_state)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class ShardSampler(Sampler[int]):
    """Sequential indices ``rank, rank + world_size, ...`` (no padding, no duplicates)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _WorkerInit:
    """Seeds each worker's global RNGs from ``(seed, worker_id)`` (picklable). Per-sample
    seeding in :class:`SeededSamples` overrides this for the data set call itself."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, worker_id: int) -> None:
        seq = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, 0xC0FFEE, worker_id])
        s = int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))
        random.seed(s)
        np.random.seed(s % (2**32))
        torch.manual_seed(s)


def build_detection_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
    start_step: int = 0,
    collate_fn: Callable[[Sequence[Any]], Any] = collate_detection,
    shuffle: bool = True,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """Endless iterator of training batches (``collate_fn`` output, by default
    ``(ImageBatch, list[BoxTargets])``).

    Batch ``k`` of this rank holds stream positions ``k*batch_size ... (k+1)*batch_size - 1``
    of an :class:`InfiniteSampler` ``(len(dataset), seed, shuffle, rank, world_size)``; with
    ``start_step=k`` the first yielded batch is batch ``k`` of the uninterrupted run, identical
    bit for bit (augmentation seeded per sample position, see :class:`SeededSamples`).
    ``rank``/``world_size`` default to the initialised ``torch.distributed`` group (else 0/1).
    Workers persist for the life of the iterator; ``pin_memory`` (set it when training on
    CUDA) returns page-locked batches, which the loop copies to the GPU asynchronously.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0 (got {start_step})")
    d_rank, d_world = _dist_rank_world()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    start = start_step * batch_size
    sampler = InfiniteSampler(len(dataset), seed=seed, shuffle=shuffle,  # type: ignore[arg-type]
                              rank=rank, world_size=world_size, start=start)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        SeededSamples(dataset, seed, rank),
        batch_size=batch_size,
        sampler=PositionedSampler(sampler, start),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=True,
        worker_init_fn=_WorkerInit(seed) if num_workers > 0 else None,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
    return iter(loader)


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int | None = None,
    world_size: int | None = None,
    collate_fn: Callable[[Sequence[Any]], Any] = collate_detection,
    pin_memory: bool = False,
) -> DataLoader:
    """Sequential loader over this rank's shard ``rank::world_size`` (no padding, so every
    image is evaluated exactly once across ranks). ``rank``/``world_size`` default to the
    initialised ``torch.distributed`` group (else 0/1)."""
    d_rank, d_world = _dist_rank_world()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=False,
        pin_memory=pin_memory,
    )
