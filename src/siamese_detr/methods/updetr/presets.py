"""UP-DETR recipes (registered in :data:`siamese_detr.presets.PRESETS`).

``updetr/detr/in1k`` is the official recipe of dddzg/up-detr; the Conditional and Deformable
DETR recipes are the UP-DETR baselines of Zx55/SiameseDETR (``configs/selfsup/updetr/main``).
The file and line of every number are in docs/method.md, section "UP-DETR". The detector
blocks and schedules shared with the Siamese DETR recipes are read from
:mod:`siamese_detr.presets` when a preset is built.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from siamese_detr.config import (
    EngineConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    UPDETROptions,
)

__all__ = ["UPDETR_PRESETS"]


def _base() -> ModuleType:
    from siamese_detr import presets

    return presets


def _updetr(name: str, model: ModelConfig, images: str, per_gpu: int, optim: OptimConfig,
            opts: UPDETROptions, workers: int = 4) -> RunConfig:
    base = _base()
    pre = PretrainConfig(method="updetr", images=images, updetr=opts, batch_size=per_gpu,
                         num_workers=workers)
    return RunConfig(
        name=name,
        task="pretrain",
        output_dir=f"runs/{name.replace('/', '_')}",
        model=base._frozen(model, base._SWAV),
        pretrain=pre,
        optim=optim,
        loss=LossConfig(cls_loss="ce", eos_coef=0.1, cls_weight=1.0, cost_class=1.0),
        engine=EngineConfig(ckpt_every=5000, log_every=50),
    )


# dddzg/up-detr: 8 GPUs x 32 images, 60 epochs, lr x0.1 after 40, AdamW lr 1e-4 wd 1e-4,
# clip 0.1, frozen CNN (lr_backbone 0).
_UPDETR_OPTIM = OptimConfig(lr=1e-4, lr_backbone=0.0, weight_decay=1e-4, clip_max_norm=0.1,
                            unit="epoch", length=60, lr_drops=(40,))
_IN1K_IMAGES = "data/imagenet/train"
_COCO_IMAGES = "data/coco/train2017"
_COCO_UPDETR = UPDETROptions(base_scales=tuple(range(480, 801, 32)), base_max_size=1333)


def updetr_vanilla_in1k() -> RunConfig:
    return _updetr("updetr/detr/in1k", _base()._detr_model(1), _IN1K_IMAGES, 32,
                   _UPDETR_OPTIM, UPDETROptions(), workers=16)


def updetr_conditional_in1k() -> RunConfig:
    b = _base()
    return _updetr("updetr/conditional-100q/in1k", b._conditional_model(1), _IN1K_IMAGES, 16,
                   b._IN1K_OPTIM, UPDETROptions())


def updetr_conditional_300q_in1k() -> RunConfig:
    b = _base()
    return _updetr("updetr/conditional-300q/in1k", b._conditional_model(1, 300), _IN1K_IMAGES,
                   16, b._IN1K_OPTIM, UPDETROptions())


def updetr_deformable_ss_in1k() -> RunConfig:
    b = _base()
    return _updetr("updetr/deformable-ss-300q/in1k", b._deformable_model(1, 1), _IN1K_IMAGES,
                   8, b._IN1K_OPTIM, UPDETROptions())


def updetr_deformable_ms_in1k() -> RunConfig:
    b = _base()
    return _updetr("updetr/deformable-ms-300q/in1k", b._deformable_model(1, 4), _IN1K_IMAGES,
                   8, b._IN1K_OPTIM, UPDETROptions())


def updetr_conditional_coco() -> RunConfig:
    b = _base()
    return _updetr("updetr/conditional-100q/coco", b._conditional_model(1), _COCO_IMAGES, 4,
                   b._COCO_PRE_OPTIM, _COCO_UPDETR)


def _tiny_updetr(variant: str) -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        name = f"tiny/{variant}/updetr"
        opts = UPDETROptions(num_patches=5, patch_size=64, base_scales=(160, 176, 192),
                             base_max_size=256)
        pre = PretrainConfig(method="updetr", images="demo_data/unlabeled", updetr=opts,
                             batch_size=4, num_workers=0)
        return RunConfig(
            name=name,
            task="pretrain",
            output_dir=f"runs/{name.replace('/', '_')}",
            model=_base()._tiny_model(variant, 1, "all"),
            pretrain=pre,
            loss=LossConfig(cls_loss="ce", eos_coef=0.1, cls_weight=1.0, cost_class=1.0),
            optim=OptimConfig(lr=2e-4, lr_backbone=0.0, unit="iter", length=300,
                              lr_drops=(240,)),
            engine=EngineConfig(log_every=10, ckpt_every=100, device="cpu"),
        )
    return preset


UPDETR_PRESETS: dict[str, Callable[[], RunConfig]] = {
    "updetr/detr/in1k": updetr_vanilla_in1k,
    "updetr/conditional-100q/in1k": updetr_conditional_in1k,
    "updetr/conditional-300q/in1k": updetr_conditional_300q_in1k,
    "updetr/deformable-ss-300q/in1k": updetr_deformable_ss_in1k,
    "updetr/deformable-ms-300q/in1k": updetr_deformable_ms_in1k,
    "updetr/conditional-100q/coco": updetr_conditional_coco,
    "tiny/vanilla/updetr": _tiny_updetr("vanilla"),
    "tiny/conditional/updetr": _tiny_updetr("conditional"),
    "tiny/deformable/updetr": _tiny_updetr("deformable"),
}
