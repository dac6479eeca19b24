"""engine/env.py: the loader's ``num_workers=-1`` (auto) from the CPU cores of the process."""

from __future__ import annotations

import pytest

from siamese_detr.config import ConfigError, DataConfig, PretrainConfig
from siamese_detr.engine import env


def _machine(monkeypatch, cores: int, **variables: str) -> None:
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("cores", "variables", "workers"), [
    (16, {}, 15),  # one GPU on session 7's 16-core H100 machine: one core kept for training
    (128, {}, 16),  # at most 16
    (96, {"LOCAL_WORLD_SIZE": "8"}, 11),  # torchrun, 8 processes per node: 12 cores each
    (64, {"SLURM_NTASKS_PER_NODE": "4"}, 15),  # SLURM, 4 tasks per node
    (2, {}, 1),  # this CI machine
    (1, {}, 0),  # one core: batches made in the training process
    (8, {"LOCAL_WORLD_SIZE": "8"}, 0),
])
def test_auto_workers_share_the_cores_of_the_node(monkeypatch, cores, variables, workers):
    _machine(monkeypatch, cores, **variables)
    assert env.auto_num_workers() == workers
    assert env.resolve_num_workers(env.AUTO_WORKERS) == workers
    assert env.resolve_num_workers(3) == 3  # a number is taken as it is


def test_num_workers_minus_one_is_auto_and_below_is_refused():
    assert PretrainConfig(num_workers=-1).num_workers == env.AUTO_WORKERS
    assert DataConfig(num_workers=-1).num_workers == env.AUTO_WORKERS
    with pytest.raises(ConfigError, match=r"pretrain.num_workers=-2: must be >= 0, or -1"):
        PretrainConfig(num_workers=-2)


def test_paper_pretraining_presets_pick_their_workers():
    """The paper pretraining presets size their loaders to the machine (session 7, H100: 4
    workers gave 2.61x the graphed step's demand, 12 gave 4.66x); tiny CPU presets keep 0."""
    from siamese_detr.presets import get_preset

    for name in ("siamese/detr/in1k", "siamese/conditional-100q/in1k",
                 "siamese/deformable-ms-300q/in1k"):
        assert get_preset(name).pretrain.num_workers == env.AUTO_WORKERS, name
