"""Named recipes: each preset is a function returning a complete :class:`RunConfig`.

Paper recipes follow the official configs (Zx55/SiameseDETR ``configs/selfsup/siamese_detr``)
and the upstream fine-tuning repositories; the source of each number is in ``docs/method.md``.
Tiny presets shrink the model and data so that a run finishes on a laptop CPU in minutes.
Variations are built with ``dataclasses.replace``, never by mutating a shared base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from siamese_detr.config import (
    BackboneConfig,
    ConfigError,
    DataConfig,
    DETRegOptions,
    EngineConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    SiameseOptions,
    UPDETROptions,
)
from siamese_detr.engine.env import AUTO_WORKERS

# ---------------------------------------------------------------- model building blocks


def _detr_model(num_classes: int) -> ModelConfig:
    """facebookresearch/detr R50: 6+6 layers, FFN 2048, 100 queries, softmax CE."""
    return ModelConfig(variant="vanilla", num_classes=num_classes, num_queries=100)


def _conditional_model(num_classes: int, queries: int = 100) -> ModelConfig:
    """Atten4Vis/ConditionalDETR R50: 6+6 layers, FFN 2048, focal loss."""
    return ModelConfig(variant="conditional", num_classes=num_classes, num_queries=queries)


def _deformable_model(num_classes: int, levels: int = 4) -> ModelConfig:
    """fundamentalvision/Deformable-DETR R50: FFN 1024, 300 queries, 4 points, focal loss."""
    return ModelConfig(
        variant="deformable",
        num_classes=num_classes,
        num_queries=300,
        dim_feedforward=1024,
        num_feature_levels=levels,
    )


def _frozen(model: ModelConfig, weights: str = "") -> ModelConfig:
    return replace(model, backbone=BackboneConfig(freeze="all", weights=weights))


def _run_dir(name: str) -> str:
    """A preset's default output folder: ``runs/`` and its name with ``_`` for ``/``."""
    return f"runs/{name.replace('/', '_')}"


# the paper recipes' logging and checkpoints; the DETR-style (softmax) loss of the
# pretext tasks with a "region" class, and of DETR and Conditional DETR
_PAPER_ENGINE = EngineConfig(ckpt_every=5000, log_every=50)
_DETR_LOSS = LossConfig(cls_loss="ce", eos_coef=0.1, cls_weight=1.0, cost_class=1.0)


def _run(name: str, task: str, model: ModelConfig, optim: OptimConfig,
         engine: EngineConfig = _PAPER_ENGINE, **parts: object) -> RunConfig:
    """A preset: ``name`` with its :func:`_run_dir`, and the given parts (``data``,
    ``pretrain``, ``loss``)."""
    return RunConfig(name=name, task=task, output_dir=_run_dir(name), model=model,
                     optim=optim, engine=engine, **parts)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fine-tuning recipes

_COCO = DataConfig(
    train_images="data/coco/train2017",
    train_ann="data/coco/annotations/instances_train2017.json",
    val_images="data/coco/val2017",
    val_ann="data/coco/annotations/instances_val2017.json",
)
_VOC = DataConfig(
    train_images="data/voc",
    train_ann="data/voc/voc0712_trainval.json",
    val_images="data/voc",
    val_ann="data/voc/voc07_test.json",
)
# the official VOC fine-tuning trains on VOC2012 trainval only (Zx55/SiameseDETR
# downstream_finetune/conditionaldetr/datasets/voc.py, build()) and tests on VOC2007 test, with
# the official json box convention: siamese-detr voc2coco --box-convention official
_VOC12 = replace(_VOC, train_ann="data/voc/voc12_trainval_official.json",
                 val_ann="data/voc/voc07_test_official.json")


def _finetune(name: str, model: ModelConfig, data: DataConfig, optim: OptimConfig,
              global_batch: int) -> RunConfig:
    return _run(name, "finetune", model, optim, data=replace(data, global_batch=global_batch))


# Siamese DETR downstream (conditional): lr 1e-4, backbone lr 5e-5, 50 epochs, drop at 40;
# 8 GPUs x 2 images = 16 per step (train_*.sh --ntasks-per-node=8, main.py --batch_size 2).
_COND_OPTIM = OptimConfig(lr=1e-4, lr_backbone=5e-5, length=50, lr_drops=(40,))
_COND_BATCH = 16
# Deformable DETR: lr 2e-4, backbone 2e-5, 50 epochs, drop at 40; reference_points and
# sampling_offsets at 0.1 x lr (main.py lr_linear_proj_mult); total batch 32 (README).
_DEFORM_OPTIM = OptimConfig(lr=2e-4, lr_backbone=2e-5, length=50, lr_drops=(40,),
                            lr_linear_proj_mult=0.1)
_DEFORM_BATCH = 32
# DETR: lr 1e-4, backbone 1e-5; 150 epochs (drop 100), the UP-DETR fine-tuning schedule;
# 8 GPUs x 2 images = 16 per step (README training command, main.py --batch_size 2).
_DETR_OPTIM = OptimConfig(lr=1e-4, lr_backbone=1e-5, length=150, lr_drops=(100,))
_DETR_BATCH = 16


def finetune_conditional_voc() -> RunConfig:
    return _finetune("finetune/conditional-100q/voc", _conditional_model(20), _VOC, _COND_OPTIM,
                     _COND_BATCH)


def finetune_conditional_voc12() -> RunConfig:
    """The official VOC recipe: VOC2012 trainval only (``voc`` trains on 2007+2012)."""
    return _finetune("finetune/conditional-100q/voc12", _conditional_model(20), _VOC12,
                     _COND_OPTIM, _COND_BATCH)


def finetune_conditional_coco() -> RunConfig:
    return _finetune("finetune/conditional-100q/coco", _conditional_model(91), _COCO, _COND_OPTIM,
                     _COND_BATCH)


def finetune_detr_coco() -> RunConfig:
    return _finetune("finetune/detr/coco", _detr_model(91), _COCO, _DETR_OPTIM, _DETR_BATCH)


def finetune_detr_voc() -> RunConfig:
    return _finetune("finetune/detr/voc", _detr_model(20), _VOC, _DETR_OPTIM, _DETR_BATCH)


def finetune_detr_voc12() -> RunConfig:
    return _finetune("finetune/detr/voc12", _detr_model(20), _VOC12, _DETR_OPTIM, _DETR_BATCH)


def finetune_deformable_coco() -> RunConfig:
    cfg = _finetune("finetune/deformable-ms-300q/coco", _deformable_model(91), _COCO,
                    _DEFORM_OPTIM, _DEFORM_BATCH)
    return replace(cfg, eval=replace(cfg.eval, max_detections=100))


def finetune_deformable_voc() -> RunConfig:
    return _finetune("finetune/deformable-ms-300q/voc", _deformable_model(20), _VOC,
                     _DEFORM_OPTIM, _DEFORM_BATCH)


def finetune_deformable_voc12() -> RunConfig:
    return _finetune("finetune/deformable-ms-300q/voc12", _deformable_model(20), _VOC12,
                     _DEFORM_OPTIM, _DEFORM_BATCH)


# ---------------------------------------------------------------- pretraining recipes

_SWAV = "weights/swav_800ep_pretrain.pth.tar"
# ImageNet configs: 32 GPUs x 8 (vanilla/conditional) or 64 x 4 (deformable) = 256 images,
# 300k iterations, lr x0.1 at 200k, AdamW lr 1e-4 wd 1e-4, clip 0.1.
_IN1K_OPTIM = OptimConfig(lr=1e-4, lr_backbone=0.0, unit="iter", length=300_000,
                          lr_drops=(200_000,))
# COCO configs: 16 GPUs x 4 = 64 images, 120k iterations, drop at 80k.
_COCO_PRE_OPTIM = OptimConfig(lr=1e-4, lr_backbone=0.0, unit="iter", length=120_000,
                              lr_drops=(80_000,))


def _pretrain(name: str, model: ModelConfig, images: str, store: str, per_gpu: int,
              optim: OptimConfig, siamese: SiameseOptions) -> RunConfig:
    global_batch = 256 if images == _IN1K[0] else 64  # 32 x 8 / 64 x 4, or 16 x 4 (COCO)
    pre = PretrainConfig(method="siamese", images=images, siamese=siamese,
                         batch_size=per_gpu, global_batch=global_batch,
                         num_workers=AUTO_WORKERS)
    pre = replace(pre, proposals=replace(pre.proposals, store=store))
    return _run(name, "pretrain", _frozen(model, _SWAV), optim, pretrain=pre, loss=_DETR_LOSS)


_IN1K = ("data/imagenet/train", "data/proposals/imagenet")
_COCO_IMAGES = ("data/coco/train2017", "data/proposals/coco")
_COCO_SIAMESE = SiameseOptions(
    weight_region=3.0, weight_global=0.3,
    base_scales=tuple(range(480, 801, 32)), base_max_size=1333,
)


def siamese_vanilla_in1k() -> RunConfig:
    return _pretrain("siamese/detr/in1k", _detr_model(1), *_IN1K, 8, _IN1K_OPTIM,
                     SiameseOptions(weight_region=3.0))


def siamese_conditional_in1k() -> RunConfig:
    return _pretrain("siamese/conditional-100q/in1k", _conditional_model(1), *_IN1K, 8,
                     _IN1K_OPTIM, SiameseOptions(weight_region=5.0))


def siamese_conditional_300q_in1k() -> RunConfig:
    return _pretrain("siamese/conditional-300q/in1k", _conditional_model(1, 300), *_IN1K, 8,
                     _IN1K_OPTIM, SiameseOptions(weight_region=5.0))


def siamese_deformable_ss_in1k() -> RunConfig:
    return _pretrain("siamese/deformable-ss-300q/in1k", _deformable_model(1, 1), *_IN1K, 4,
                     _IN1K_OPTIM, SiameseOptions(weight_region=3.0))


def siamese_deformable_ms_in1k() -> RunConfig:
    return _pretrain("siamese/deformable-ms-300q/in1k", _deformable_model(1, 4), *_IN1K, 4,
                     _IN1K_OPTIM, SiameseOptions(weight_region=3.0))


def siamese_conditional_coco() -> RunConfig:
    return _pretrain("siamese/conditional-100q/coco", _conditional_model(1), *_COCO_IMAGES, 4,
                     _COCO_PRE_OPTIM, _COCO_SIAMESE)


# ---------------------------------------------------------------- official-code recipes


def official(preset: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    """The paper-faithful twin of a pretraining preset: everything the official code does
    differently from our defaults (docs/method.md, "faithful vs improved"): L_g pooled over the
    padded map, the official pretraining initialisation, and for Deformable DETR the region
    queries of sample 0 for the whole batch."""
    def faithful() -> RunConfig:
        cfg = preset()
        deformable = cfg.model.variant == "deformable"
        siamese = replace(cfg.pretrain.siamese, pool_padding=True, official_init=True,
                          per_sample_queries=not deformable)
        name = cfg.name + "-official"
        return replace(cfg, name=name, output_dir=_run_dir(name),
                       pretrain=replace(cfg.pretrain, siamese=siamese))
    faithful.__doc__ = f"Official-code twin of {preset.__name__}."
    return faithful


# ---------------------------------------------------------------- UP-DETR recipes
# Sources of every number: docs/method.md, UP-DETR section (dddzg/up-detr for vanilla DETR,
# Zx55/SiameseDETR configs/selfsup/updetr/main for the Conditional / Deformable baselines).


def _updetr_pretrain(name: str, model: ModelConfig, images: str, per_gpu: int,
                     optim: OptimConfig, opts: UPDETROptions, workers: int = AUTO_WORKERS
                     ) -> RunConfig:
    pre = PretrainConfig(method="updetr", images=images, updetr=opts, batch_size=per_gpu,
                         num_workers=workers)
    return _run(name, "pretrain", _frozen(model, _SWAV), optim, pretrain=pre, loss=_DETR_LOSS)


# dddzg/up-detr: 8 GPUs x 32 images, 60 epochs, lr x0.1 after 40, AdamW lr 1e-4 wd 1e-4,
# clip 0.1, frozen CNN (lr_backbone 0).
_UPDETR_OPTIM = OptimConfig(lr=1e-4, lr_backbone=0.0, weight_decay=1e-4, clip_max_norm=0.1,
                            unit="epoch", length=60, lr_drops=(40,))
_COCO_UPDETR = UPDETROptions(base_scales=tuple(range(480, 801, 32)), base_max_size=1333)


def updetr_vanilla_in1k() -> RunConfig:
    return _updetr_pretrain("updetr/detr/in1k", _detr_model(1), _IN1K[0], 32, _UPDETR_OPTIM,
                            UPDETROptions(), workers=16)


def updetr_conditional_in1k() -> RunConfig:
    return _updetr_pretrain("updetr/conditional-100q/in1k", _conditional_model(1), _IN1K[0], 16,
                            _IN1K_OPTIM, UPDETROptions())


def updetr_conditional_300q_in1k() -> RunConfig:
    return _updetr_pretrain("updetr/conditional-300q/in1k", _conditional_model(1, 300),
                            _IN1K[0], 16, _IN1K_OPTIM, UPDETROptions())


def updetr_deformable_ss_in1k() -> RunConfig:
    return _updetr_pretrain("updetr/deformable-ss-300q/in1k", _deformable_model(1, 1),
                            _IN1K[0], 8, _IN1K_OPTIM, UPDETROptions())


def updetr_deformable_ms_in1k() -> RunConfig:
    return _updetr_pretrain("updetr/deformable-ms-300q/in1k", _deformable_model(1, 4),
                            _IN1K[0], 8, _IN1K_OPTIM, UPDETROptions())


def updetr_conditional_coco() -> RunConfig:
    return _updetr_pretrain("updetr/conditional-100q/coco", _conditional_model(1),
                            _COCO_IMAGES[0], 4, _COCO_PRE_OPTIM, _COCO_UPDETR)


# ---------------------------------------------------------------- tiny CPU recipes


def _tiny_model(variant: str, num_classes: int, freeze: str) -> ModelConfig:
    levels = 2 if variant == "deformable" else 1
    return ModelConfig(
        variant=variant,  # type: ignore[arg-type]
        backbone=BackboneConfig(depth=18, freeze=freeze),  # type: ignore[arg-type]
        num_classes=num_classes,
        hidden_dim=64,
        nheads=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=256,
        dropout=0.0,
        num_queries=20,
        num_feature_levels=levels,
    )


_TINY_ENGINE = EngineConfig(log_every=10, ckpt_every=100)
_TINY_DATA = DataConfig(
    train_images="demo_data/detection/images",
    train_ann="demo_data/detection/train.json",
    val_images="demo_data/detection/images",
    val_ann="demo_data/detection/val.json",
    augment="fixed",
    train_scales=(160,),
    max_size=256,
    val_size=160,
    batch_size=4,
    num_workers=0,
)


def _tiny_finetune(variant: str) -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        name = f"tiny/{variant}/finetune"
        optim = OptimConfig(lr=2e-4, lr_backbone=2e-5, clip_max_norm=0.1, unit="iter",
                            length=300, lr_drops=(240,))
        return _run(name, "finetune", _tiny_model(variant, 3, "stem+layer1"), optim,
                    _TINY_ENGINE, data=_TINY_DATA)
    return preset


def _tiny_pretrain(name: str, variant: str, pre: PretrainConfig) -> RunConfig:
    """The tiny pretraining recipe shared by the softmax-headed pretext tasks (Siamese DETR,
    UP-DETR): a 1-class tiny detector, frozen backbone, 300 iterations."""
    optim = OptimConfig(lr=2e-4, lr_backbone=0.0, unit="iter", length=300, lr_drops=(240,))
    return _run(name, "pretrain", _tiny_model(variant, 1, "all"), optim, _TINY_ENGINE,
                pretrain=pre, loss=_DETR_LOSS)


def _tiny_siamese(variant: str) -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        name = f"tiny/{variant}/siamese"
        siamese = SiameseOptions(num_regions=5, crop_size=64, base_scales=(160, 176, 192),
                                 base_max_size=256, weight_region=3.0, weight_global=1.0)
        pre = PretrainConfig(method="siamese", images="demo_data/unlabeled", siamese=siamese,
                             batch_size=4, num_workers=0)
        pre = replace(pre, proposals=replace(pre.proposals, store="demo_data/proposals"))
        return _tiny_pretrain(name, variant, pre)
    return preset


def _tiny_updetr(variant: str) -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        name = f"tiny/{variant}/updetr"
        opts = UPDETROptions(num_patches=5, patch_size=64, base_scales=(160, 176, 192),
                             base_max_size=256)
        pre = PretrainConfig(method="updetr", images="demo_data/unlabeled", updetr=opts,
                             batch_size=4, num_workers=0)
        return _tiny_pretrain(name, variant, pre)
    return preset


# ---------------------------------------------------------------- DETReg recipes
# amirbar/DETReg configs/DETReg_top30_*.sh and util/default_args.py; file and line of
# each number in docs/method.md, section "DETReg".

# SwAV ResNet-50 frozen (lr_backbone 0); Selective Search proposals, as DETReg used
_SS_IN1K = ("data/imagenet/train", "data/proposals/imagenet-ss")
_SS_COCO = ("data/coco/train2017", "data/proposals/coco-ss")


def _detreg(name: str, model: ModelConfig, images: str, store: str, per_gpu: int,
            optim: OptimConfig, loss: LossConfig, opts: DETRegOptions | None = None,
            engine: EngineConfig | None = None, workers: int = AUTO_WORKERS) -> RunConfig:
    pre = PretrainConfig(method="detreg", images=images, detreg=opts or DETRegOptions(),
                         batch_size=per_gpu, num_workers=workers)
    pre = replace(pre, proposals=replace(pre.proposals, store=store))
    return _run(name, "pretrain", model, optim, engine or _PAPER_ENGINE, pretrain=pre,
                loss=loss)


# Deformable DETR defaults: lr 2e-4, FFN 1024, 300 queries, focal class weight/cost 2
_DEFORM_LOSS = LossConfig()  # auto -> focal, cls 2, L1 5, GIoU 2, costs 2/5/2


def detreg_deformable_in1k() -> RunConfig:
    # DETReg_top30_in.sh: 5 epochs, lr_drop 40 never reached; 8 GPUs x 24 images
    return _detreg("detreg/deformable-ms-300q/in1k", _frozen(_deformable_model(1, 4), _SWAV),
                   *_SS_IN1K, 24, OptimConfig(lr=2e-4, lr_backbone=0.0, length=5, lr_drops=()),
                   _DEFORM_LOSS)


def detreg_deformable_coco() -> RunConfig:
    # DETReg_top30_coco.sh: the Deformable defaults, 50 epochs, lr drop at 40
    return _detreg("detreg/deformable-ms-300q/coco", _frozen(_deformable_model(1, 4), _SWAV),
                   *_SS_COCO, 24,
                   OptimConfig(lr=2e-4, lr_backbone=0.0, length=50, lr_drops=(40,)),
                   _DEFORM_LOSS)


def detreg_detr_in1k() -> RunConfig:
    # DETReg_top30_in_detr.sh: 60 epochs (lr_drop 200 never reached), lr 1e-4, 100 queries
    return _detreg("detreg/detr/in1k", _frozen(_detr_model(1), _SWAV), *_SS_IN1K, 24,
                   OptimConfig(lr=1e-4, lr_backbone=0.0, length=60, lr_drops=()), _DETR_LOSS)


def detreg_conditional_in1k() -> RunConfig:
    # no official recipe: the deformable IN-1k schedule (5 epochs) with Conditional DETR's
    # lr 1e-4, 100 queries and focal loss
    return _detreg("detreg/conditional-100q/in1k", _frozen(_conditional_model(1), _SWAV),
                   *_SS_IN1K, 24, OptimConfig(lr=1e-4, lr_backbone=0.0, length=5, lr_drops=()),
                   LossConfig())


def _tiny_detreg(variant: str) -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        name = f"tiny/{variant}/detreg"
        opts = DETRegOptions(max_proposals=10, crop_size=64, base_scales=(160, 176, 192),
                             base_max_size=256, crop_scales=(160, 200, 240),
                             crop_range=(154, 240))
        loss = _DETR_LOSS if variant == "vanilla" else LossConfig()
        return _detreg(name, _tiny_model(variant, 1, "all"), "demo_data/unlabeled",
                       "demo_data/proposals", 4,
                       OptimConfig(lr=2e-4, lr_backbone=0.0, unit="iter", length=300,
                                   lr_drops=(240,)), loss, opts, _TINY_ENGINE, workers=0)
    return preset


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "finetune/conditional-100q/voc": finetune_conditional_voc,
    "finetune/conditional-100q/voc12": finetune_conditional_voc12,
    "finetune/detr/voc12": finetune_detr_voc12,
    "finetune/deformable-ms-300q/voc12": finetune_deformable_voc12,
    "finetune/conditional-100q/coco": finetune_conditional_coco,
    "finetune/detr/coco": finetune_detr_coco,
    "finetune/detr/voc": finetune_detr_voc,
    "finetune/deformable-ms-300q/coco": finetune_deformable_coco,
    "finetune/deformable-ms-300q/voc": finetune_deformable_voc,
    "siamese/detr/in1k": siamese_vanilla_in1k,
    "siamese/conditional-100q/in1k": siamese_conditional_in1k,
    "siamese/conditional-300q/in1k": siamese_conditional_300q_in1k,
    "siamese/deformable-ss-300q/in1k": siamese_deformable_ss_in1k,
    "siamese/deformable-ms-300q/in1k": siamese_deformable_ms_in1k,
    "siamese/conditional-100q/coco": siamese_conditional_coco,
    **{f"{fn().name}-official": official(fn) for fn in (
        siamese_vanilla_in1k, siamese_conditional_in1k, siamese_conditional_300q_in1k,
        siamese_deformable_ss_in1k, siamese_deformable_ms_in1k, siamese_conditional_coco)},
    "tiny/vanilla/finetune": _tiny_finetune("vanilla"),
    "tiny/conditional/finetune": _tiny_finetune("conditional"),
    "tiny/deformable/finetune": _tiny_finetune("deformable"),
    "tiny/vanilla/siamese": _tiny_siamese("vanilla"),
    "tiny/conditional/siamese": _tiny_siamese("conditional"),
    "tiny/deformable/siamese": _tiny_siamese("deformable"),
    "updetr/detr/in1k": updetr_vanilla_in1k,
    "updetr/conditional-100q/in1k": updetr_conditional_in1k,
    "updetr/conditional-300q/in1k": updetr_conditional_300q_in1k,
    "updetr/deformable-ss-300q/in1k": updetr_deformable_ss_in1k,
    "updetr/deformable-ms-300q/in1k": updetr_deformable_ms_in1k,
    "updetr/conditional-100q/coco": updetr_conditional_coco,
    "tiny/vanilla/updetr": _tiny_updetr("vanilla"),
    "tiny/conditional/updetr": _tiny_updetr("conditional"),
    "tiny/deformable/updetr": _tiny_updetr("deformable"),
    "detreg/deformable-ms-300q/in1k": detreg_deformable_in1k,
    "detreg/deformable-ms-300q/coco": detreg_deformable_coco,
    "detreg/detr/in1k": detreg_detr_in1k,
    "detreg/conditional-100q/in1k": detreg_conditional_in1k,
    "tiny/vanilla/detreg": _tiny_detreg("vanilla"),
    "tiny/conditional/detreg": _tiny_detreg("conditional"),
    "tiny/deformable/detreg": _tiny_detreg("deformable"),
}


def get_preset(name: str) -> RunConfig:
    """The config of preset ``name``; an unknown name suggests the closest one."""
    import difflib

    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (see `siamese-detr config list`)")
    return PRESETS[name]()
