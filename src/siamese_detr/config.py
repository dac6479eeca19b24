"""The typed configuration tree: the single source of truth for every run.

Each block is a frozen, keyword-only dataclass. Combinations that make no sense are rejected
in ``__post_init__``. Dict/YAML conversion, dotted ``key.sub=value`` overrides and the
"did you mean" errors live in :mod:`siamese_detr.configio`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from siamese_detr.errors import ConfigError  # re-exported: the old import path

Variant = Literal["vanilla", "conditional", "deformable"]
VARIANTS: tuple[Variant, ...] = ("vanilla", "conditional", "deformable")
Method = Literal["siamese", "updetr", "detreg"]
METHODS: tuple[Method, ...] = ("siamese", "updetr", "detreg")




@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    depth: Literal[18, 34, 50] = 50  # ResNet depth (18/34 only for tiny CPU presets)
    weights: str = ""  # local weight file: SwAV release, torchvision state dict or .safetensors
    weights_format: Literal["auto", "swav", "torchvision", "safetensors"] = "auto"
    allow_missing_keys: bool = False  # accept a weight file that does not cover the backbone
    frozen_bn: bool = True  # FrozenBatchNorm2d everywhere (DETR)
    # "all": nothing trains (pretraining); "stem+layer1": DETR fine-tuning default; "none"
    freeze: Literal["all", "stem+layer1", "none"] = "stem+layer1"
    # fold each frozen batch norm into the frozen convolution before it (same outputs up to
    # rounding, same state dict; the whole trunk in pretraining, stem+layer1 in fine-tuning)
    fold_frozen_bn: bool = True
    # run the ResNet in the channels-last memory format (cuDNN's bf16 convolutions are NHWC:
    # saves its layout conversions; not measured to pay yet, see docs/benchmarks.md)
    channels_last: bool = False
    # on CUDA, run each frozen folded convolution with its bias, residual add and ReLU as one
    # cuDNN fused call (no backward: only where no gradient flows, e.g. the whole frozen
    # pretraining trunk, the stem and layer1 in fine-tuning); needs fold_frozen_bn; not
    # measured to pay yet, see docs/benchmarks.md
    fused_conv_relu: bool = False

    def __post_init__(self) -> None:
        if self.fused_conv_relu and not self.fold_frozen_bn:
            raise ConfigError("model.backbone.fused_conv_relu=true needs "
                              "model.backbone.fold_frozen_bn=true (set both, or turn it off)")
        if self.weights_format == "safetensors" and self.weights and not self.weights.endswith(
            ".safetensors"
        ):
            raise ConfigError(
                "model.backbone.weights_format=safetensors needs a .safetensors file "
                f"(got {self.weights!r})"
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    variant: Variant = "conditional"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 91  # real classes (COCO ids go to 90 -> 91); no-object added internally
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    aux_loss: bool = True  # loss on every decoder layer
    # deformable only
    num_feature_levels: int = 1  # 1 (single-scale C5) or 4 (C3-C5 + extra stride-64 level)
    enc_n_points: int = 4
    dec_n_points: int = 4
    box_refine: bool = False  # iterative bounding-box refinement

    def __post_init__(self) -> None:
        if self.variant != "deformable" and self.num_feature_levels != 1:
            raise ConfigError(
                f"model.num_feature_levels={self.num_feature_levels} needs "
                "model.variant=deformable (vanilla/conditional are single-scale)"
            )
        if self.variant != "deformable" and self.box_refine:
            raise ConfigError("model.box_refine=true needs model.variant=deformable")
        if self.num_feature_levels not in (1, 2, 3, 4):
            raise ConfigError("model.num_feature_levels must be 1, 2, 3 or 4")
        if self.hidden_dim % self.nheads != 0:
            raise ConfigError(
                f"model.hidden_dim={self.hidden_dim} must be divisible by model.nheads"
            )
        if self.variant == "deformable" and self.hidden_dim % 32 != 0:
            raise ConfigError("model.hidden_dim must be a multiple of 32 (GroupNorm(32)) "
                              "for variant=deformable")
        if self.num_classes < 1:
            raise ConfigError("model.num_classes must be >= 1")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    # "auto": softmax CE for vanilla, sigmoid focal for conditional/deformable
    cls_loss: Literal["auto", "ce", "focal"] = "auto"
    eos_coef: float = 0.1  # CE weight of the no-object class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cls_weight: float = -1.0  # -1: 1 for ce, 2 for focal (upstream defaults)
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    cost_class: float = -1.0  # -1: 1 for ce, 2 for focal
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


def _check_loader(section: str, batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"{section}.batch_size={batch_size}: must be >= 1 (images per process)")
    if num_workers < -1:
        raise ConfigError(f"{section}.num_workers={num_workers}: must be >= 0, or -1 for one "
                          "worker per CPU core of the process (auto)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """A COCO-format detection data set (images folder + json)."""

    train_images: str = ""
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    # "detr": DETR multi-scale + random crop; "fixed": one scale (tiny presets); "none"
    augment: Literal["detr", "fixed", "none"] = "detr"
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    max_size: int = 1333
    val_size: int = 800
    batch_size: int = 2  # per process
    # images per optimiser step over all processes; 0 = batch_size x world size x
    # engine.accum_steps. When set, engine.accum_steps is derived from it at start-up.
    global_batch: int = 0
    num_workers: int = 2  # loader worker processes; -1: one per CPU core of the process, max 16

    def __post_init__(self) -> None:
        _check_loader("data", self.batch_size, self.num_workers)
        if self.global_batch < 0:
            raise ConfigError("data.global_batch must be >= 0 (0 = not fixed)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0 disables clipping
    # schedule length and lr drops are in ``unit``; resolved to iterations at run time
    unit: Literal["epoch", "iter"] = "epoch"
    length: float = 50
    lr_drops: tuple[float, ...] = (40,)
    gamma: float = 0.1
    warmup_iters: int = 0
    # Deformable DETR: parameters named *reference_points* / *sampling_offsets* train at
    # lr x this (upstream main.py: 0.1); 1.0 = no separate group (DETR, Conditional DETR and
    # the official Siamese DETR pretraining, which has one lr for everything)
    lr_linear_proj_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.lr_linear_proj_mult <= 0:
            raise ConfigError("optim.lr_linear_proj_mult must be > 0 (1.0 = same lr as the "
                              "rest of the transformer)")
        if self.length <= 0:
            raise ConfigError("optim.length must be > 0")
        if any(d > self.length for d in self.lr_drops):
            raise ConfigError(
                f"optim.lr_drops={list(self.lr_drops)} lie past optim.length={self.length}"
            )


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"  # ignored on CPU
    accum_steps: int = 1
    log_every: int = 20  # iterations
    ckpt_every: int = 5000  # iterations; a checkpoint is also written at the end
    eval_every: int = 0  # iterations; 0 = only at the end (fine-tuning)
    keep_checkpoints: int = 2  # periodic checkpoints kept besides last.pt
    tensorboard: bool = False
    progress: bool = True
    # torch.use_deterministic_algorithms (warn-only), cuDNN deterministic, cuBLAS's fixed
    # workspace, and the fast paths that are not deterministic off (cuDNN's fused
    # convolutions). Slower. The deformable attention backward still adds with atomics, as
    # the upstream CUDA kernel and grid_sample do: not bit-reproducible on a GPU (a warning)
    deterministic: bool = False
    # torch.compile the transformer's encoder and decoder (dynamic shapes); see engine/compile
    compile: bool = False
    # CUDA only: the dense part of the step (detector forward and backward, before the
    # matching) replayed from CUDA graphs, one per padded batch shape; see engine/graphs.
    # Fine-tuning and all pretraining methods; needs accum_steps=1
    cuda_graphs: bool = False
    cuda_graphs_max: int = 16  # graphs kept (one per shape); batches of other shapes: eager
    # shared: all graphs of a task allocate from one memory pool (about the largest shape's
    # activations in all); per_graph: one pool per graph (every shape's activations held)
    cuda_graphs_pool: Literal["shared", "per_graph"] = "shared"
    # CUDA only: torch.backends.cudnn.benchmark (cuDNN times its convolution algorithms once
    # per input shape and keeps the fastest). Pays where shapes recur (cuda_graphs' padded
    # shapes); with free image sizes every new shape is timed again. Not measured yet: off
    cudnn_benchmark: bool = False
    # pad each batch's height and width up to a multiple of this (fewer distinct shapes for
    # cuda_graphs and compile); 0 = with cuda_graphs 128 for fine-tuning and 64 for
    # pretraining, else no extra padding
    pad_to_multiple: int = 0
    max_empty_batches: int = 100  # consecutive batches without a usable sample -> stop
    max_nonfinite_steps: int = 2  # steps with a non-finite loss skipped; one more -> stop

    def __post_init__(self) -> None:
        if self.accum_steps < 1:
            raise ConfigError("engine.accum_steps must be >= 1")
        if self.cuda_graphs and self.accum_steps != 1:
            raise ConfigError("engine.cuda_graphs=true needs engine.accum_steps=1 (a graph's "
                              "gradients live in its own buffers): set one of them")
        if self.cuda_graphs_max < 1:
            raise ConfigError("engine.cuda_graphs_max must be >= 1")
        if self.deterministic and self.cudnn_benchmark:
            raise ConfigError("engine.cudnn_benchmark=true picks cuDNN algorithms by timing, "
                              "which engine.deterministic=true rules out: set one of them")
        if self.pad_to_multiple < 0:
            raise ConfigError("engine.pad_to_multiple must be >= 0 (0: automatic)")
        if self.max_empty_batches < 1:
            raise ConfigError("engine.max_empty_batches must be >= 1")
        if self.max_nonfinite_steps < 0:
            raise ConfigError("engine.max_nonfinite_steps must be >= 0 (0: stop at the first)")


@dataclass(frozen=True, kw_only=True)
class ProposalReadConfig:
    store: str = ""  # proposal store directory written by ``siamese-detr proposals``
    top_k: int = 512  # read at most this many boxes per image (in score order)
    min_size: float = 0.0  # drop boxes with a side below this many pixels
    min_score: float = -1.0e9


@dataclass(frozen=True, kw_only=True)
class SiameseOptions:
    """Siamese DETR (Chen et al. 2023); numbers from the official configs, see docs/method.md."""

    num_regions: int = 10  # M: overlap rectangle + 9 proposals
    view_scale: tuple[float, float] = (0.5, 1.0)
    view_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    view_iou: float = 0.5
    view_stochastic: bool = True
    area_min_ratio: float = 0.05
    box_source: Literal["proposals", "random"] = "proposals"
    box_jitter: float = 0.1  # model-side jitter before RoIAlign (targets untouched)
    crop_size: int = 128
    # where the colour pipelines of views and crops run and the crops are cut: "worker" (PIL,
    # in the loader workers), "device" (batched on the training device: workers send the
    # un-coloured views and the random parameters they drew), "auto" = device on a GPU
    augment_on: Literal["auto", "worker", "device"] = "auto"
    # with augment_on=device, where the two views are resized from the base image: "device"
    # (workers send the views' outer rectangle once and the device renders both views,
    # bilinear, within 1 level of PIL) or "worker" (PIL in the workers)
    view_resize_on: Literal["worker", "device"] = "device"
    region_discrimination: bool = True  # L_r (feature reconstruction of region crops)
    global_discrimination: bool = True  # L_g (SimSiam on pooled encoder memory)
    weight_region: float = 5.0  # lambda_r
    weight_global: float = 10.0  # lambda_g
    # base resize before view cropping (ImageNet: 320-480, max 600)
    base_scales: tuple[int, ...] = (320, 336, 352, 368, 400, 416, 432, 448, 464, 480)
    base_max_size: int = 600
    per_sample_queries: bool = True  # False reproduces the official deformable batch-0 quirk
    # L_g pooling of the encoder memory: False = valid positions only (ours), True = the whole
    # padded map (official neck)
    pool_padding: bool = False
    # True: the official pretraining initialisation (default PyTorch init of the box head, no
    # -0.5 offset in the Deformable position encoding) instead of upstream fine-tuning's
    official_init: bool = False


@dataclass(frozen=True, kw_only=True)
class UPDETROptions:
    num_patches: int = 10
    feature_recon: bool = True
    query_shuffle: bool = False
    mask_ratio: float = 0.1  # fraction of patch features zeroed
    patch_size: int = 128
    min_patch: int = 8
    weight_recon: float = 1.0
    base_scales: tuple[int, ...] = (320, 336, 352, 368, 400, 416, 432, 448, 464, 480)
    base_max_size: int = 600
    # where the patches' colour pipeline runs: "worker", "device" (workers send uint8 patches
    # and the parameters they drew) or "auto" (device on a GPU); as pretrain.siamese.augment_on
    augment_on: Literal["auto", "worker", "device"] = "auto"


@dataclass(frozen=True, kw_only=True)
class DETRegOptions:
    """DETReg (Bar et al. 2022); numbers from amirbar/DETReg, see docs/method.md."""

    max_proposals: int = 30  # top-k proposal boxes used as targets
    # "topk": this image's best boxes; "random": the best boxes of another (random) image
    strategy: Literal["topk", "random"] = "topk"
    object_embedding_loss: bool = True
    weight_embedding: float = 1.0
    # target embedding: "crops" (official: frozen backbone C3, GAP, on augmented crops of
    # crop_size px) or "roi" (RoIAlign + GAP on the detector's own frozen feature maps)
    embedding_source: Literal["crops", "roi"] = "crops"
    crop_size: int = 128
    min_boxes: int = 2  # images with fewer surviving boxes are skipped (official: 2)
    base_scales: tuple[int, ...] = (320, 336, 352, 368, 400, 416, 432, 448, 464, 480)
    base_max_size: int = 600
    # DETR's second branch: resize to one of these, random crop, then base resize
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_range: tuple[int, int] = (384, 600)
    # where the crops' colour pipeline runs: "worker", "device" (workers send uint8 crops and
    # the parameters they drew) or "auto" (device on a GPU); as pretrain.siamese.augment_on
    augment_on: Literal["auto", "worker", "device"] = "auto"

    def __post_init__(self) -> None:
        if self.max_proposals < 1:
            raise ConfigError("pretrain.detreg.max_proposals must be >= 1")
        if self.min_boxes < 1:
            raise ConfigError("pretrain.detreg.min_boxes must be >= 1")
        if self.crop_range[0] > self.crop_range[1]:
            raise ConfigError("pretrain.detreg.crop_range must be (min, max) with min <= max")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    method: Method = "siamese"
    images: str = ""  # image folder (recursive), list file or COCO json of unlabeled images
    proposals: ProposalReadConfig = field(default_factory=ProposalReadConfig)
    siamese: SiameseOptions = field(default_factory=SiameseOptions)
    updetr: UPDETROptions = field(default_factory=UPDETROptions)
    detreg: DETRegOptions = field(default_factory=DETRegOptions)
    batch_size: int = 8  # per process
    # images per optimiser step over all processes (official: 256 on ImageNet, 64 on COCO);
    # 0 = batch_size x world size x engine.accum_steps. When set, engine.accum_steps is
    # derived from it at start-up.
    global_batch: int = 0
    num_workers: int = 4  # loader worker processes; -1: one per CPU core of the process, max 16

    def __post_init__(self) -> None:
        _check_loader("pretrain", self.batch_size, self.num_workers)
        if self.global_batch < 0:
            raise ConfigError("pretrain.global_batch must be >= 0 (0 = not fixed)")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    metric: Literal["coco", "voc07", "voc-area"] = "coco"
    score_threshold: float = 0.0
    max_detections: int = 100


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "run"
    task: Literal["finetune", "pretrain"] = "finetune"
    output_dir: str = "runs/run"
    seed: int = 42
    init: str = ""  # checkpoint to initialise the detector from (pretrained or converted)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.task == "pretrain" and self.model.backbone.freeze != "all":
            raise ConfigError(
                "task=pretrain needs model.backbone.freeze=all (the backbone is frozen)"
            )
        if (self.task == "pretrain" and self.pretrain.method == "siamese"
                and not self.pretrain.siamese.per_sample_queries
                and self.model.variant != "deformable"):
            raise ConfigError(
                "pretrain.siamese.per_sample_queries=false reproduces a quirk of the official "
                "Deformable DETR code only; set it to true for "
                f"model.variant={self.model.variant}"
            )


HeadActivation = Literal["softmax", "sigmoid"]


def head_activation(cfg: ModelConfig, loss: LossConfig) -> HeadActivation:
    """The class head a fine-tuning run builds: ``"softmax"`` over ``num_classes + 1`` columns
    (last = no-object; cross-entropy) or ``"sigmoid"`` over ``num_classes`` (focal loss)."""
    return "softmax" if resolved_cls_loss(cfg, loss) == "ce" else "sigmoid"


def resolved_cls_loss(cfg: ModelConfig, loss: LossConfig) -> Literal["ce", "focal"]:
    """The classification loss actually used: 'auto' picks the variant's upstream default."""
    if loss.cls_loss != "auto":
        return loss.cls_loss
    return "ce" if cfg.variant == "vanilla" else "focal"
