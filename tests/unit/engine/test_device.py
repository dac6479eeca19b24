"""``engine.device=auto``: the GPU when CUDA is present, the CPU otherwise, for every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siamese_detr.config import ConfigError
from siamese_detr.engine.distributed import resolve_device, single_process
from siamese_detr.presets import PRESETS, get_preset


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend CUDA is available; record ``set_device`` instead of touching a GPU."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_local_gpu_when_present(fake_gpu):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert single_process("auto").device == torch.device("cuda", 0)
    assert fake_gpu == [torch.device("cuda", 0)]  # made current


def test_auto_is_the_cpu_without_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert single_process().device == torch.device("cpu")
    with pytest.raises(ConfigError, match="engine.device=cuda"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="engine.device=tpu"):
        resolve_device("tpu")


def test_every_preset_defaults_to_auto():
    assert {name: get_preset(name).engine.device for name in PRESETS} == {
        name: "auto" for name in PRESETS}


def test_demo_stages_run_on_the_gpu_when_present(fake_gpu, tmp_path: Path):
    from siamese_detr.demo import demo

    plan = demo.DemoPlan.scaled(0.1)
    assert plan.device == "auto"
    stages = {"pre": demo.pretrain_config(tmp_path, plan),
              "ft": demo.finetune_config(tmp_path, plan, "")}
    for name, cfg in stages.items():
        assert cfg.engine.device == "auto"
        runs: list[torch.device] = []
        demo._train_stage(tmp_path, name, cfg,
                          lambda c, info, resume, runs=runs: runs.append(info.device))
        assert runs == [torch.device("cuda", 0)]
    cpu_plan = demo.DemoPlan.scaled(0.1, device="cpu")
    assert demo.pretrain_config(tmp_path, cpu_plan).engine.device == "cpu"
