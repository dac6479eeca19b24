"""DETReg recipes (registered in :data:`siamese_detr.presets.PRESETS`).

Numbers from amirbar/DETReg (``configs/DETReg_top30_*.sh``, ``util/default_args.py``); the
file and line of each are in docs/method.md, section "DETReg".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from siamese_detr.config import (
    DETRegOptions,
    EngineConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
)

__all__ = ["DETREG_PRESETS"]

# SwAV ResNet-50 frozen (lr_backbone 0); Selective Search proposals, as DETReg used
_SS_IN1K = ("data/imagenet/train", "data/proposals/imagenet-ss")
_SS_COCO = ("data/coco/train2017", "data/proposals/coco-ss")


def _detreg(name: str, model: ModelConfig, images: str, store: str, per_gpu: int,
            optim: OptimConfig, loss: LossConfig, opts: DETRegOptions | None = None,
            engine: EngineConfig | None = None, workers: int = 8) -> RunConfig:
    pre = PretrainConfig(method="detreg", images=images, detreg=opts or DETRegOptions(),
                         batch_size=per_gpu, num_workers=workers)
    pre = replace(pre, proposals=replace(pre.proposals, store=store))
    return RunConfig(name=name, task="pretrain", output_dir=f"runs/{name.replace('/', '_')}",
                     model=model, pretrain=pre, optim=optim, loss=loss,
                     engine=engine or EngineConfig(ckpt_every=5000, log_every=50))


# Deformable DETR defaults: lr 2e-4, FFN 1024, 300 queries, focal class weight/cost 2
_DEFORM_LOSS = LossConfig()  # auto -> focal, cls 2, L1 5, GIoU 2, costs 2/5/2
_DETR_LOSS = LossConfig(cls_loss="ce", eos_coef=0.1, cls_weight=1.0, cost_class=1.0)


def detreg_deformable_in1k() -> RunConfig:
    from siamese_detr.presets import _SWAV, _deformable_model, _frozen

    # DETReg_top30_in.sh: 5 epochs, lr_drop 40 never reached; 8 GPUs x 24 images
    return _detreg("detreg/deformable-ms-300q/in1k", _frozen(_deformable_model(1, 4), _SWAV),
                   *_SS_IN1K, 24, OptimConfig(lr=2e-4, lr_backbone=0.0, length=5, lr_drops=()),
                   _DEFORM_LOSS)


def detreg_deformable_coco() -> RunConfig:
    from siamese_detr.presets import _SWAV, _deformable_model, _frozen

    # DETReg_top30_coco.sh: the Deformable defaults, 50 epochs, lr drop at 40
    return _detreg("detreg/deformable-ms-300q/coco", _frozen(_deformable_model(1, 4), _SWAV),
                   *_SS_COCO, 24,
                   OptimConfig(lr=2e-4, lr_backbone=0.0, length=50, lr_drops=(40,)),
                   _DEFORM_LOSS)


def detreg_detr_in1k() -> RunConfig:
    from siamese_detr.presets import _SWAV, _detr_model, _frozen

    # DETReg_top30_in_detr.sh: 60 epochs (lr_drop 200 never reached), lr 1e-4, 100 queries
    return _detreg("detreg/detr/in1k", _frozen(_detr_model(1), _SWAV), *_SS_IN1K, 24,
                   OptimConfig(lr=1e-4, lr_backbone=0.0, length=60, lr_drops=()), _DETR_LOSS)


def detreg_conditional_in1k() -> RunConfig:
    from siamese_detr.presets import _SWAV, _conditional_model, _frozen

    # no official recipe: the deformable IN-1k schedule (5 epochs) with Conditional DETR's
    # lr 1e-4, 100 queries and focal loss
    return _detreg("detreg/conditional-100q/in1k", _frozen(_conditional_model(1), _SWAV),
                   *_SS_IN1K, 24, OptimConfig(lr=1e-4, lr_backbone=0.0, length=5, lr_drops=()),
                   LossConfig())


def _tiny_detreg(variant: str) -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        from siamese_detr.presets import _tiny_model

        name = f"tiny/{variant}/detreg"
        opts = DETRegOptions(max_proposals=10, crop_size=64, base_scales=(160, 176, 192),
                             base_max_size=256, crop_scales=(160, 200, 240),
                             crop_range=(154, 240))
        loss = _DETR_LOSS if variant == "vanilla" else LossConfig()
        return _detreg(name, _tiny_model(variant, 1, "all"), "demo_data/unlabeled",
                       "demo_data/proposals", 4,
                       OptimConfig(lr=2e-4, lr_backbone=0.0, unit="iter", length=300,
                                   lr_drops=(240,)), loss, opts,
                       EngineConfig(log_every=10, ckpt_every=100, device="cpu"), workers=0)
    return preset


DETREG_PRESETS: dict[str, Callable[[], RunConfig]] = {
    "detreg/deformable-ms-300q/in1k": detreg_deformable_in1k,
    "detreg/deformable-ms-300q/coco": detreg_deformable_coco,
    "detreg/detr/in1k": detreg_detr_in1k,
    "detreg/conditional-100q/in1k": detreg_conditional_in1k,
    "tiny/vanilla/detreg": _tiny_detreg("vanilla"),
    "tiny/conditional/detreg": _tiny_detreg("conditional"),
    "tiny/deformable/detreg": _tiny_detreg("deformable"),
}
