"""Issue 12 items 1-2: Deformable DETR's linear-projection lr group and the global batch."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from siamese_detr.config import OptimConfig
from siamese_detr.configio import apply_overrides
from siamese_detr.engine.batching import apply_global_batch, plan_batch
from siamese_detr.engine.optim import build_optimizer, param_groups, set_lr
from siamese_detr.errors import ConfigError
from siamese_detr.presets import get_preset


def _tiny_deformable():
    from siamese_detr.models.detector import build_detector

    torch.manual_seed(0)
    return build_detector(get_preset("tiny/deformable/finetune").model, 3)


def test_linear_proj_group_holds_exactly_the_named_parameters() -> None:
    det = _tiny_deformable()
    groups = {g["name"]: g for g in param_groups(det, 2e-4, 2e-5, 1e-4, 0.1)}
    assert set(groups) == {"transformer", "backbone", "linear_proj"}
    names = {id(p): n for n, p in det.named_parameters()}
    proj = sorted(names[id(p)] for p in groups["linear_proj"]["params"])
    expected = sorted(n for n, p in det.named_parameters() if p.requires_grad and (
        "reference_points" in n or "sampling_offsets" in n))
    # 2 encoder + 2 decoder layers x (weight, bias) sampling offsets + reference_points
    assert proj == expected and len(proj) == 10
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert groups["transformer"]["lr"] == pytest.approx(2e-4)
    assert not any("sampling_offsets" in names[id(p)] for p in groups["transformer"]["params"])
    # every trainable parameter is in exactly one group
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in det.parameters())


def test_multiplier_one_keeps_the_two_group_layout() -> None:
    det = _tiny_deformable()
    assert [g["name"] for g in param_groups(det, 1e-4, 1e-5, 1e-4)] == ["transformer",
                                                                         "backbone"]
    assert [g["name"] for g in param_groups(det, 1e-4, 1e-5, 1e-4, 1.0)] == ["transformer",
                                                                              "backbone"]


def test_schedule_keeps_the_ratio_and_presets_use_upstream_values() -> None:
    det = _tiny_deformable()
    opt = build_optimizer(det, OptimConfig(lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1))
    set_lr(opt, 0.1)  # after the lr drop
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["linear_proj"] == pytest.approx(2e-6) and lrs["transformer"] == pytest.approx(2e-5)
    # upstream Deformable DETR fine-tuning: 0.1; official Siamese DETR pretraining: one lr
    assert get_preset("finetune/deformable-ms-300q/coco").optim.lr_linear_proj_mult == 0.1
    assert get_preset("finetune/conditional-100q/coco").optim.lr_linear_proj_mult == 1.0
    assert get_preset("siamese/deformable-ms-300q/in1k").optim.lr_linear_proj_mult == 1.0
    with pytest.raises(ConfigError, match="optim.lr_linear_proj_mult"):
        OptimConfig(lr_linear_proj_mult=0.0)


@pytest.mark.parametrize("world,accum", [(1, 64), (2, 32), (4, 16), (8, 8), (16, 4), (32, 2),
                                         (64, 1)])
def test_pretraining_global_batch_for_world_sizes(world: int, accum: int) -> None:
    cfg = get_preset("siamese/deformable-ms-300q/in1k")  # 4 images per process, 256 per step
    plan = plan_batch(cfg, world)
    assert (plan.per_process, plan.world_size, plan.accum_steps) == (4, world, accum)
    assert plan.global_batch == 256
    resolved, _ = apply_global_batch(cfg, world)
    assert resolved.engine.accum_steps == accum


@pytest.mark.parametrize("world,accum", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_finetuning_global_batch_for_world_sizes(world: int, accum: int) -> None:
    cfg = get_preset("finetune/deformable-ms-300q/coco")  # 2 per process, 32 per step
    plan = plan_batch(cfg, world)
    assert plan.accum_steps == accum and plan.global_batch == 32
    assert plan.describe() == (
        f"effective global batch 32 = 2 per process x {world} "
        f"process{'es' if world > 1 else ''} x {accum} accumulation "
        f"step{'s' if accum > 1 else ''}")


def test_global_batch_that_does_not_divide_is_a_clear_error() -> None:
    cfg = get_preset("siamese/detr/in1k")  # 8 per process, 256 per step
    with pytest.raises(ConfigError) as err:
        plan_batch(cfg, 3)
    msg = str(err.value)
    assert "pretrain.global_batch=256" in msg and "pretrain.batch_size=8" in msg
    assert "3 process(es) = 24" in msg and "\n" not in msg
    cfg = get_preset("finetune/conditional-100q/coco")
    with pytest.raises(ConfigError, match="data.global_batch=16 is not a multiple"):
        plan_batch(apply_overrides(cfg, ["data.batch_size=3"]), 1)
    with pytest.raises(ConfigError, match="data.global_batch"):
        apply_overrides(cfg, ["data.global_batch=-1"])


def test_without_global_batch_accumulation_comes_from_the_engine() -> None:
    cfg = get_preset("tiny/conditional/siamese")
    assert cfg.pretrain.global_batch == 0
    cfg = replace(cfg, engine=replace(cfg.engine, accum_steps=3))
    plan = plan_batch(cfg, 2)
    assert plan.accum_steps == 3 and plan.global_batch == 4 * 2 * 3
    assert apply_global_batch(cfg, 2)[0] is cfg


def test_start_up_line_prints_the_effective_global_batch(tmp_path, caplog) -> None:
    """A 1-iteration tiny fine-tuning run with ``data.global_batch=8`` on one process logs
    the plan (4 per process x 1 x 2 accumulation steps) and trains with that accumulation."""
    from siamese_detr.demo.synthetic import make_detection_set
    from siamese_detr.engine.distributed import DistInfo
    from siamese_detr.runner import run

    paths = make_detection_set(tmp_path / "det", 4, 2, (64, 64), seed=0)
    cfg = apply_overrides(get_preset("tiny/vanilla/finetune"), [
        f"data.train_images={paths.train_images}", f"data.train_ann={paths.train_ann}",
        f"data.val_images={paths.val_images}", f"data.val_ann={paths.val_ann}",
        "data.train_scales=64", "data.val_size=64", "data.global_batch=8",
        "optim.length=1", "optim.lr_drops=1", f"output_dir={tmp_path / 'run'}",
        "engine.progress=false", "model.enc_layers=1", "model.dec_layers=1",
    ])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        run(cfg, info)
    text = caplog.text
    assert "effective global batch 8 = 4 per process x 1 process x 2 accumulation steps" in text
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "accum_steps: 2" in saved and "global_batch: 8" in saved
