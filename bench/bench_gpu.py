"""Training-step speed of our detectors against Hugging Face ``transformers``, in one process.

For each variant (DETR 100q, Conditional DETR 100q, Deformable DETR multi-scale 300q) and each
precision (fp32, bf16 autocast), three steps are built once and then run interleaved, step
after step, in a rotating order:

* ``ours``: our fine-tuning step (forward, set criterion, backward, grad clip 0.1, AdamW);
* ``hf``: the same step on ``transformers``' ``*ForObjectDetection`` (loss computed by the
  model from ``labels``), built from a config with random weights, no download;
* ``pretrain``: our Siamese DETR pretraining step on the same detector size and batch (both
  views and both directions as one ``2B`` batch);
* ``pretrain_2x``: the same step through ``forward_per_direction`` (each view encoded and each
  direction decoded on its own: the path before the ``2B`` batching), for the ratio.

Equal configuration on both sides: ResNet-50 (frozen BatchNorm, stem+layer1 frozen: the HF
freeze rule is re-applied by name because its own does not match ``stages.N``), hidden 256,
6+6 layers, FFN as our paper preset (2048; 1024 for Deformable DETR), the same dropout on
both sides (``dropout = attention_dropout = activation_dropout`` = ours), auxiliary losses on,
the same optimiser groups (lr 1e-4 / backbone 1e-5, wd 1e-4) and clipping. Random targets
(4 boxes per image), unpadded images, TF32 matmul off.

Reported per row: median ms/step after warm-ups (CUDA-synchronised), images/s, peak memory
during the step, aten ops per step (also split into forward+loss+backward and the update:
clip + AdamW; ours is fused, transformers' side gets torch's default AdamW: foreach on CUDA,
a per-tensor loop on the CPU) and host syncs per step (one extra step under
``siamese_detr.engine.profiling.OpCounter``; on the CPU it also counts ``.to("cpu")`` of
tensors already there), trainable parameters, and ``ours/hf`` ratios.
Everything is printed and written to ``--out`` (JSON, rewritten after every measurement).

    PYTHONPATH=src python bench/bench_gpu.py --check --out results.json    # GPU, paper sizes
    PYTHONPATH=src python bench/bench_gpu.py --device cpu --small          # CPU, small sizes
    PYTHONPATH=src python bench/bench_gpu.py --quick                       # fewer steps

On CPU only op and sync counts mean something (the machine may be shared); times are shown
but must not be read as results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from siamese_detr.engine.optim import build_optimizer
from siamese_detr.engine.profiling import OpCounter
from siamese_detr.losses.set_criterion import build_criterion, num_logits
from siamese_detr.models.detector import build_detector
from siamese_detr.presets import get_preset
from siamese_detr.structures import BoxTargets, ImageBatch

VARIANTS = {
    "detr": ("finetune/detr/coco", "siamese/detr/in1k"),
    "conditional": ("finetune/conditional-100q/coco", "siamese/conditional-100q/in1k"),
    "deformable": ("finetune/deformable-ms-300q/coco", "siamese/deformable-ms-300q/in1k"),
}
LR, LR_BACKBONE, WD, CLIP = 1e-4, 1e-5, 1e-4, 0.1
BOXES_PER_IMAGE = 4


# ---------------------------------------------------------------- output


class Results:
    """Rows and checks, printed and rewritten atomically to ``path`` after every change."""

    def __init__(self, path: str | None, meta: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"meta": meta, "rows": [], "ratios": [], "checks": [],
                                     "errors": []}
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def add(self, key: str, item: dict[str, Any]) -> None:
        self.data[key].append(item)
        self.flush()


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- inputs


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1088"`` -> ``(800, 1088)``: a ``--size`` option's height and width."""
    h, w = text.lower().split("x")
    return int(h), int(w)


def make_images(b: int, h: int, w: int, device: torch.device, seed: int = 0) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    return ImageBatch(torch.randn(b, 3, h, w, generator=g), torch.zeros(b, h, w, dtype=torch.bool),
                      torch.tensor([[h, w]] * b)).to(device)


def make_targets(b: int, num_classes: int, device: torch.device, seed: int = 1
                 ) -> list[BoxTargets]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(b):
        cxcy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 0.3 + 0.1
        labels = torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=g)
        out.append(BoxTargets(torch.cat([cxcy, wh], -1), labels).to(device))
    return out


def make_siamese_batch(b: int, h: int, w: int, m: int, crop: int, device: torch.device,
                       augment_on_device: bool = False, render: bool = True) -> Any:
    """Random views, regions and crops (float, as normalised); with ``augment_on_device`` the
    loader output of ``augment_on=device`` instead: no crops, the colour parameters (the step
    cuts and colours the crops and colours the views), and the views' source rectangles (the
    step renders the views: ``view_resize_on=device``) or, without ``render``, uint8
    un-coloured views."""
    try:
        from siamese_detr.methods.siamese.data import SiameseBatch
    except ImportError:  # before the issue-15 layout
        from siamese_detr.data.pretrain import SiameseBatch  # type: ignore[no-redef]

    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    xy = torch.rand(b, m, 2, generator=g) * 0.5
    wh = torch.rand(b, m, 2, generator=g) * 0.3 + 0.1
    boxes = torch.cat([xy, xy + wh], -1) * scale
    if augment_on_device:
        import numpy as np

        from siamese_detr.methods.siamese.colour import sample_colour_params
        from siamese_detr.methods.siamese.views import DeferredAugment

        rng = np.random.default_rng(0)

        def params(*shape: int) -> torch.Tensor:
            n = int(np.prod(shape))
            return torch.tensor(np.stack([sample_colour_params(rng) for _ in range(n)]),
                                dtype=torch.float32).view(*shape, -1)

        def views(seed: int) -> ImageBatch:
            gen = torch.Generator().manual_seed(seed)
            return ImageBatch(torch.randint(0, 256, (b, 3, h, w), generator=gen,
                                            dtype=torch.uint8),
                              torch.zeros(b, h, w, dtype=torch.bool),
                              torch.tensor([[h, w]] * b)).to(device)

        deferred = DeferredAugment(params(b, 2), params(b, 2, m), crop)
        if render:  # view_resize_on=device (the default): one source rectangle per sample
            gen = torch.Generator().manual_seed(5)
            deferred.source = torch.randint(0, 256, (b, 3, h + 2, w + 2), generator=gen,
                                            dtype=torch.uint8)
            deferred.source_sizes = torch.tensor([[h + 2, w + 2]] * b)
            inner = torch.tensor([1.0, 1.0, w + 1.0, h + 1.0])
            shrink = torch.tensor([0.1 * w, 0.1 * h, 0.0, 0.0])
            deferred.rects = torch.stack([inner + shrink, inner - shrink.roll(2)])[None].repeat(
                b, 1, 1)
            placeholder = ImageBatch(torch.zeros(b, 3, 0, 0, dtype=torch.uint8),
                                     torch.zeros(b, h, w, dtype=torch.bool),
                                     torch.tensor([[h, w]] * b)).to(device)
            return SiameseBatch(view1=placeholder, view2=placeholder, boxes1=boxes.to(device),
                                boxes2=boxes.clone().to(device), crops1=None, crops2=None,
                                image_ids=[str(i) for i in range(b)],
                                deferred=deferred.to(device))
        return SiameseBatch(view1=views(3), view2=views(4), boxes1=boxes.to(device),
                            boxes2=boxes.clone().to(device), crops1=None, crops2=None,
                            image_ids=[str(i) for i in range(b)], deferred=deferred.to(device))
    crops = torch.randn(b, m, 3, crop, crop, generator=g)
    return SiameseBatch(view1=make_images(b, h, w, device, 3),
                        view2=make_images(b, h, w, device, 4),
                        boxes1=boxes.to(device), boxes2=boxes.clone().to(device),
                        crops1=crops.to(device), crops2=crops.clone().to(device),
                        image_ids=[str(i) for i in range(b)])


# ---------------------------------------------------------------- models


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _backbone_options(cfg: Any, fold: bool, channels_last: bool = False,
                      fused: bool = False) -> Any:
    """``cfg`` with ``model.backbone.fold_frozen_bn=fold``, ``.channels_last`` and
    ``.fused_conv_relu`` (where the fields exist)."""
    if not hasattr(cfg.model.backbone, "fold_frozen_bn"):
        return cfg
    backbone = replace(cfg.model.backbone, fold_frozen_bn=fold)
    if channels_last:
        backbone = replace(backbone, channels_last=True)
    if fused:
        backbone = replace(backbone, fused_conv_relu=True)
    return replace(cfg, model=replace(cfg.model, backbone=backbone))


def build_ours(variant: str, device: torch.device, fold: bool = True, channels_last: bool = False,
               fused: bool = False) -> tuple[Any, Any, Any]:
    cfg = _backbone_options(get_preset(VARIANTS[variant][0]), fold, channels_last, fused)
    model = build_detector(cfg.model, num_logits(cfg.model, cfg.loss)).to(device)
    criterion = build_criterion(cfg.model, cfg.loss).to(device)
    optim_cfg = replace(cfg.optim, lr=LR, lr_backbone=LR_BACKBONE, weight_decay=WD)
    return cfg, (model, criterion), build_optimizer(model, optim_cfg)


def build_pretrain(variant: str, device: torch.device, crop: int | None, fold: bool = True,
                   channels_last: bool = False, fused: bool = False) -> tuple[Any, Any, Any]:
    from siamese_detr.methods.siamese.task import build_siamese_task

    cfg = _backbone_options(get_preset(VARIANTS[variant][1]), fold, channels_last, fused)
    model_cfg = replace(cfg.model, backbone=replace(cfg.model.backbone, weights=""))
    siamese = cfg.pretrain.siamese
    if crop is not None:
        siamese = replace(siamese, crop_size=crop)
    cfg = replace(cfg, model=model_cfg, pretrain=replace(cfg.pretrain, siamese=siamese))
    task = build_siamese_task(cfg).to(device)
    optim_cfg = replace(cfg.optim, lr=LR, lr_backbone=0.0, weight_decay=WD)
    return cfg, task, build_optimizer(task, optim_cfg)


def _hf_freeze_stem_layer1(model: torch.nn.Module) -> None:
    """Train layer2-4 (``stages.1-3`` / timm ``layer2-4``) of the HF backbone, nothing else of
    it. transformers' own rule checks ``"stage.1" in name``, which never matches the ResNet
    backbone's ``stages.1``, so it would freeze the whole backbone."""
    backbone = model.model.backbone
    keep = ("stages.1.", "stages.2.", "stages.3.", "layer2", "layer3", "layer4")
    for name, p in backbone.named_parameters():
        p.requires_grad_(any(k in name for k in keep))


def build_hf(variant: str, ours_cfg: Any, device: torch.device, backbone: str
             ) -> tuple[Any, Any, dict[str, Any]]:
    import transformers as tf

    m = ours_cfg.model
    deformable = variant == "deformable"
    common: dict[str, Any] = dict(
        num_labels=m.num_classes, num_queries=m.num_queries, d_model=m.hidden_dim,
        encoder_layers=m.enc_layers, decoder_layers=m.dec_layers,
        encoder_attention_heads=m.nheads, decoder_attention_heads=m.nheads,
        encoder_ffn_dim=m.dim_feedforward, decoder_ffn_dim=m.dim_feedforward,
        dropout=m.dropout, attention_dropout=m.dropout, activation_dropout=m.dropout,
        auxiliary_loss=m.aux_loss, use_pretrained_backbone=False,
    )
    if deformable:
        common.update(num_feature_levels=m.num_feature_levels, encoder_n_points=m.enc_n_points,
                      decoder_n_points=m.dec_n_points, with_box_refine=m.box_refine,
                      two_stage=False)
    if backbone == "timm":
        common.update(use_timm_backbone=True, backbone="resnet50")
    else:
        stages = ["stage2", "stage3", "stage4"] if deformable else ["stage4"]
        common.update(backbone_config=tf.ResNetConfig(out_features=stages),
                      use_timm_backbone=False)
    cls = {"detr": (tf.DetrConfig, tf.DetrForObjectDetection),
           "conditional": (tf.ConditionalDetrConfig, tf.ConditionalDetrForObjectDetection),
           "deformable": (tf.DeformableDetrConfig, tf.DeformableDetrForObjectDetection)}[variant]
    try:
        config = cls[0](**common)
    except (TypeError, ValueError):  # a transformers version without one of the flags
        common.pop("use_timm_backbone", None)
        config = cls[0](**common)
    model = cls[1](config)
    _hf_freeze_stem_layer1(model)
    model = model.to(device).train()
    backbone_params = [p for n, p in model.named_parameters()
                       if p.requires_grad and "backbone" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "backbone" not in n]
    opt = torch.optim.AdamW([{"params": rest, "lr": LR},
                             {"params": backbone_params, "lr": LR_BACKBONE}], weight_decay=WD)
    info = {"dropout": config.dropout, "attention_dropout": config.attention_dropout,
            "activation_dropout": config.activation_dropout,
            "attn_implementation": getattr(config, "_attn_implementation", None)}
    return model, opt, info


# ---------------------------------------------------------------- steps


def autocast(device: torch.device, dtype: str, weight_cache: bool = True) -> Any:
    """bf16 autocast for ``dtype == "bf16"``; ``weight_cache=False`` as the training loop sets
    it with ``engine.cuda_graphs`` (a capture cannot use the cache of cast weights)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16",
                          cache_enabled=weight_cache)


class Step:
    """One training step as two parts: ``fwd_bwd`` (forward, loss, backward) and ``update``
    (gradient clipping at 0.1, optimiser step, zero_grad)."""

    def __init__(self, fwd_bwd: Callable[[], None], opt: torch.optim.Optimizer) -> None:
        self.fwd_bwd, self.opt = fwd_bwd, opt

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                       CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.fwd_bwd()
        self.update()


def ours_step(model: Any, criterion: Any, opt: Any, images: ImageBatch,
              targets: list[BoxTargets], device: torch.device, dtype: str) -> Step:
    def fwd_bwd() -> None:
        with autocast(device, dtype):
            loss = criterion(model(images), targets)[0].total
        loss.backward()
    return Step(fwd_bwd, opt)


def graphed_step(model: Any, criterion: Any, opt: Any, images: ImageBatch,
                 targets: list[BoxTargets], device: torch.device, dtype: str,
                 losses_graph: bool = True) -> Step:
    """Our fine-tuning step with ``engine.cuda_graphs``: the detector's forward and backward
    replayed from CUDA graphs (``DetectionTask.enable_cuda_graphs``, padding to multiples of
    32, a no-op at 800x1088), the host matching eager, the losses from their own graphs
    (session 10; eager when ``losses_graph`` is False), the optimiser eager."""
    from siamese_detr.methods.supervised import DetectionTask

    task = DetectionTask(model, criterion)
    # losses_graph False: the criterion eager after the detector's graph
    task.enable_cuda_graphs(max_graphs=4, pad_multiple=32, losses=losses_graph)

    def fwd_bwd() -> None:
        with autocast(device, dtype, weight_cache=False):
            loss = task((images, targets)).total
        loss.backward()
    return Step(fwd_bwd, opt)


def pretrain_graphed_step(task: Any, opt: Any, batch: Any, device: torch.device,
                          dtype: str, losses_graph: bool = True) -> Step:
    """Our Siamese pretraining step with ``engine.cuda_graphs`` (``SiameseDETR.dense`` and,
    unless ``losses_graph`` is False, ``SiameseDETR.losses`` from CUDA graphs)."""
    if task._dense is None:
        # losses_graph False: the losses after the matching run eagerly
        task.enable_cuda_graphs(max_graphs=4, pad_multiple=32, losses=losses_graph)

    def fwd_bwd() -> None:
        with autocast(device, dtype, weight_cache=False):
            loss = task(batch).total
        loss.backward()
    return Step(fwd_bwd, opt)


def cudnn_benchmarked(step: Step) -> Step:
    """``step`` with ``torch.backends.cudnn.benchmark`` on while it runs (``engine.
    cudnn_benchmark``); a graphed step keeps the algorithms chosen at its capture."""
    inner = step.fwd_bwd

    def fwd_bwd() -> None:
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            inner()
        finally:
            torch.backends.cudnn.benchmark = before
    return Step(fwd_bwd, step.opt)


def hf_step(model: Any, opt: Any, images: ImageBatch, labels: list[dict[str, torch.Tensor]],
            device: torch.device, dtype: str) -> Step:
    pixel_mask = (~images.mask).long()

    def fwd_bwd() -> None:
        with autocast(device, dtype):
            loss = model(pixel_values=images.images, pixel_mask=pixel_mask, labels=labels).loss
        loss.backward()
    return Step(fwd_bwd, opt)


def pretrain_step(task: Any, opt: Any, batch: Any, device: torch.device, dtype: str,
                  per_direction: bool = False) -> Step:
    forward = task.forward_per_direction if per_direction else task

    def fwd_bwd() -> None:
        with autocast(device, dtype):
            loss = forward(batch).total
        loss.backward()
    return Step(fwd_bwd, opt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Run ``fn`` once; (seconds, peak MiB allocated during it, CUDA only)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return dt, peak


def count(step: Step, device: torch.device) -> dict[str, Any]:
    """Ops and host reads of one step, split into forward+loss+backward and the update."""
    sync(device)
    with OpCounter() as a:
        step.fwd_bwd()
    with OpCounter() as b:
        step.update()
    sync(device)
    sites = a.sync_sites + b.sync_sites
    return {"ops_per_step": a.ops + b.ops, "ops_fwd_bwd": a.ops, "ops_update": b.ops,
            "syncs_per_step": a.syncs + b.syncs, "syncs_update": b.syncs,
            "sync_sites": dict(sites)}


# ---------------------------------------------------------------- bench


def profile_step(step: Step, device: torch.device) -> dict[str, Any]:
    """One step under ``torch.profiler`` (CUDA only): wall ms, the sum of GPU kernel times, the
    kernel count, and the GPU's busy share (kernel time / wall: far under 1 = host-bound)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t0
    busy_us, kernels = 0.0, 0
    top: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us = e.time_range.elapsed_us()
            busy_us += us
            kernels += 1
            top[e.name[:60]] = top.get(e.name[:60], 0.0) + us
    heavy = sorted(top.items(), key=lambda kv: -kv[1])[:8]
    return {"profile_wall_ms": 1e3 * wall, "gpu_kernel_ms": busy_us / 1e3, "kernels": kernels,
            "gpu_busy": busy_us / 1e6 / wall if wall else 0.0,
            "top_kernels_ms": {k: round(v / 1e3, 3) for k, v in heavy}}


def run_variant(variant: str, dtypes: list[str], args: argparse.Namespace,
                device: torch.device, res: Results) -> None:
    """Build every implementation of ``variant`` once, then time them interleaved, one
    precision after the other (the models and optimiser states carry over)."""
    b, (h, w) = args.batch, args.size
    cfg, (model, criterion), opt = build_ours(variant, device)
    images = make_images(b, h, w, device)
    targets = make_targets(b, cfg.model.num_classes, device)
    makers: dict[str, Callable[[str], Step]] = {
        "ours": lambda dt: ours_step(model, criterion, opt, images, targets, device, dt)}
    params = {"ours": trainable(model)}
    extra: dict[str, Any] = {}
    if args.channels_last:
        # model.backbone.channels_last, as a config sets it (the trunk and its input)
        _, (lmodel, lcrit), lopt = build_ours(variant, device, channels_last=True)
        lmodel.load_state_dict(model.state_dict())
        makers["ours_cl"] = lambda dt: ours_step(lmodel, lcrit, lopt, images, targets, device,
                                                 dt)
        params["ours_cl"] = trainable(lmodel)
    if args.compile:
        from siamese_detr.engine.compile import compile_transformers

        _, (cmodel, ccrit), copt = build_ours(variant, device)
        cmodel.load_state_dict(model.state_dict())
        compile_transformers(cmodel)
        makers["ours_compiled"] = lambda dt: ours_step(cmodel, ccrit, copt, images, targets,
                                                       device, dt)
        params["ours_compiled"] = trainable(cmodel)
    if not args.no_hf:
        try:
            hf, hf_opt, info = build_hf(variant, cfg, device, args.hf_backbone)
        except Exception as e:  # measure ours anyway
            res.add("errors", {"variant": variant, "error": f"hf build: {e!r}",
                               "traceback": traceback.format_exc()})
            log(f"!! transformers {variant} could not be built: {e!r}")
        else:
            labels = [{"class_labels": t.labels, "boxes": t.boxes} for t in targets]
            makers["hf"] = lambda dt: hf_step(hf, hf_opt, images, labels, device, dt)
            params["hf"] = trainable(hf)
            extra["hf_config"] = info
    if not args.no_pretrain:
        pcfg, task, popt = build_pretrain(variant, device, args.crop)
        sb = make_siamese_batch(b, h, w, pcfg.pretrain.siamese.num_regions,
                                pcfg.pretrain.siamese.crop_size, device)
        makers["pretrain"] = lambda dt: pretrain_step(task, popt, sb, device, dt)
        params["pretrain"] = trainable(task)
        if args.augment_on_device:  # the same step finishing the loader's augmentation
            sbc = make_siamese_batch(b, h, w, pcfg.pretrain.siamese.num_regions,
                                     pcfg.pretrain.siamese.crop_size, device,
                                     augment_on_device=True)
            makers["pretrain_aug"] = lambda dt: pretrain_step(task, popt, sbc, device, dt)
            params["pretrain_aug"] = trainable(task)
        if hasattr(task, "forward_per_direction") and not args.no_pretrain_2x:
            _, ptask, popt2 = build_pretrain(variant, device, args.crop)
            ptask.load_state_dict(task.state_dict())
            makers["pretrain_2x"] = lambda dt: pretrain_step(ptask, popt2, sb, device, dt, True)
            params["pretrain_2x"] = trainable(ptask)
    if args.graphed and device.type == "cuda":
        def ours_row(name: str, wrap: Callable[[Step], Step] = lambda st: st,
                     losses_graph: bool = True, **build: Any) -> None:
            """A graphed fine-tuning row: a copy of ``model`` built with ``build``."""
            _, (m, c), o = build_ours(variant, device, **build)
            m.load_state_dict(model.state_dict())
            makers[name] = lambda dt: wrap(graphed_step(m, c, o, images, targets, device, dt,
                                                        losses_graph))
            params[name] = trainable(m)

        def pretrain_row(name: str, batch: Any = None, losses_graph: bool = True,
                         wrap: Callable[[Step], Step] = lambda st: st, **build: Any) -> None:
            """A graphed pretraining row: a copy of ``task`` built with ``build``, on
            ``batch`` (default: the finished float batch)."""
            _, t, o = build_pretrain(variant, device, args.crop, **build)
            t.load_state_dict(task.state_dict())
            on = sb if batch is None else batch
            makers[name] = lambda dt: wrap(pretrain_graphed_step(t, o, on, device, dt,
                                                                 losses_graph))
            params[name] = trainable(t)

        pretraining = not args.no_pretrain
        ours_row("ours_graphed")
        if args.losses_ab:  # the criterion after the matching eager (before session 10)
            ours_row("ours_graphed_dense_only", losses_graph=False)
        if pretraining:
            pretrain_row("pretrain_graphed")
            if args.augment_on_device:  # the default GPU pretraining
                pretrain_row("pretrain_aug_graphed", batch=sbc)
            if args.channels_last:  # model.backbone.channels_last
                pretrain_row("pretrain_graphed_cl", channels_last=True)
            if args.losses_ab:  # the losses after the matching eager
                pretrain_row("pretrain_graphed_dense_only", losses_graph=False)
        if args.fused_conv:  # model.backbone.fused_conv_relu, alone and with channels_last
            ours_row("ours_graphed_fused", fused=True)
            ours_row("ours_graphed_cl_fused", channels_last=True, fused=True)
            if pretraining:
                pretrain_row("pretrain_graphed_fused", fused=True)
                pretrain_row("pretrain_graphed_cl_fused", channels_last=True, fused=True)
        if args.cudnn_benchmark:  # engine.cudnn_benchmark: the graphs captured with it on
            ours_row("ours_graphed_cudnn", wrap=cudnn_benchmarked)
            if pretraining:
                pretrain_row("pretrain_graphed_cudnn", wrap=cudnn_benchmarked)
        if args.fold_ab:  # the same graphed steps with the batch norms left unfolded
            ours_row("ours_graphed_unfolded", fold=False)
            if pretraining:
                pretrain_row("pretrain_graphed_unfolded", fold=False)
    for dtype in dtypes:
        steps: dict[str, Step] = {}
        for k, make in makers.items():
            try:
                steps[k] = make(dtype)
            except Exception as e:  # e.g. a capture that fails: the other rows go on
                res.add("errors", {"variant": variant, "dtype": dtype, "impl": k,
                                   "error": f"build: {e!r}", "traceback": traceback.format_exc()})
                log(f"!! {k} {variant} {dtype} could not be built: {e!r}")
        try:
            time_variant(variant, dtype, steps, params, extra, cfg, args, device, res)
        except Exception as e:  # keep measuring the other rows
            res.add("errors", {"variant": variant, "dtype": dtype, "error": repr(e),
                               "traceback": traceback.format_exc()})
            log(f"!! {variant} {dtype} failed: {e!r}")
            traceback.print_exc()


def time_variant(variant: str, dtype: str, steps: dict[str, Step], params: dict[str, int],
                 extra: dict[str, Any], cfg: Any, args: argparse.Namespace,
                 device: torch.device, res: Results) -> None:
    b, (h, w) = args.batch, args.size
    log(f"\n== {variant} {dtype}: batch {b} at {h}x{w}, queries {cfg.model.num_queries}, "
        f"FFN {cfg.model.dim_feedforward}, dropout ours {cfg.model.dropout} "
        f"(hf {extra.get('hf_config', {})}), trainable params {params}")
    times: dict[str, list[float]] = {k: [] for k in steps}
    peaks: dict[str, float] = dict.fromkeys(steps, 0.0)
    names = list(steps)
    for i in range(args.warmup + args.steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for k in order:
            try:
                dt, peak = timed(steps[k], device)
            except Exception as e:  # drop this implementation, keep measuring the others
                res.add("errors", {"variant": variant, "dtype": dtype, "impl": k,
                                   "error": repr(e), "traceback": traceback.format_exc()})
                log(f"!! {k} {variant} {dtype} failed: {e!r}")
                names.remove(k)
                continue
            if i >= args.warmup:
                times[k].append(dt)
                peaks[k] = max(peaks[k], peak)
    rows = {}
    for k in names:
        counts = count(steps[k], device)
        prof: dict[str, Any] = {}
        if args.profile and device.type == "cuda" and k in ("ours", "pretrain", "hf"):
            try:
                prof = profile_step(steps[k], device)
            except Exception as e:  # a figure less, not a failed bench
                prof = {"profile_error": repr(e)}
        med = statistics.median(times[k])
        rows[k] = row = {
            "variant": variant, "dtype": dtype, "impl": k, "device": str(device),
            "batch": b, "size": [h, w], "ms_median": 1e3 * med,
            "ms_all": [1e3 * t for t in times[k]], "images_per_s": b / med,
            "peak_mib": peaks[k], **counts, "trainable_params": params[k], **prof, **extra,
        }
        res.add("rows", row)
        busy = f"  GPU busy {prof['gpu_busy']:.2f}" if "gpu_busy" in prof else ""
        log(f"  {k:13s} {row['ms_median']:8.1f} ms/step  {row['images_per_s']:7.2f} img/s  "
            f"peak {row['peak_mib']:7.0f} MiB  {counts['ops_per_step']:6d} ops "
            f"({counts['ops_fwd_bwd']} fwd+bwd, {counts['ops_update']} update)  "
            f"{counts['syncs_per_step']:3d} syncs  {params[k]:,} trainable{busy}")
    ratios: dict[str, Any] = {"variant": variant, "dtype": dtype, "batch": b, "size": [h, w]}
    # step time ratios: (numerator, denominator); "_unfolded" rows are named "unfolded"
    pairs = [(k, "ours") for k in ("ours_compiled", "ours_cl", "ours_graphed")] + [
        ("pretrain_aug_graphed", "ours_graphed"), ("pretrain_graphed_cl", "pretrain_graphed"),
        ("ours_graphed", "ours_graphed_unfolded"),
        ("pretrain_graphed", "pretrain_graphed_unfolded"),
        ("pretrain_graphed", "pretrain_graphed_dense_only"),
        ("ours_graphed", "ours_graphed_dense_only"),
        ("ours_graphed_cudnn", "ours_graphed"), ("pretrain_graphed_cudnn", "pretrain_graphed"),
        ("pretrain_graphed_dense_only", "ours_graphed"),
        ("ours_graphed_fused", "ours_graphed"), ("ours_graphed_cl_fused", "ours_graphed"),
        ("pretrain_graphed_fused", "pretrain_graphed"),
        ("pretrain_graphed_cl_fused", "pretrain_graphed"),
        ("pretrain_graphed_fused", "ours_graphed_fused"),
        ("pretrain_graphed_cl_fused", "ours_graphed_cl_fused"),
        ("pretrain_graphed", "ours_graphed"), ("pretrain_graphed", "pretrain")]
    for a, b in pairs:
        if a in rows and b in rows:
            under = "unfolded" if b == f"{a}_unfolded" else b
            ratios[f"{a}_over_{under}_ms"] = rows[a]["ms_median"] / rows[b]["ms_median"]
    if "hf" in rows and "ours" in rows:
        ratios["ours_over_hf_ms"] = rows["ours"]["ms_median"] / rows["hf"]["ms_median"]
        ratios["ours_over_hf_ops"] = rows["ours"]["ops_per_step"] / rows["hf"]["ops_per_step"]
        ratios["ours_over_hf_ops_fwd_bwd"] = (rows["ours"]["ops_fwd_bwd"]
                                              / rows["hf"]["ops_fwd_bwd"])
    for k in ("pretrain", "pretrain_2x", "pretrain_aug"):
        if k in rows and "ours" in rows:
            ratios[f"{k}_over_ours_ms"] = rows[k]["ms_median"] / rows["ours"]["ms_median"]
            ratios[f"{k}_over_ours_ops"] = rows[k]["ops_per_step"] / rows["ours"]["ops_per_step"]
    res.add("ratios", ratios)
    log("  ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()
                                 if isinstance(v, float)))


def bf16_vs_fp32(res: Results) -> None:
    """ours bf16 speed-up over ours fp32, per variant, from the rows measured so far."""
    rows = res.data["rows"]
    for v in VARIANTS:
        for impl in ("ours", "ours_cl", "ours_compiled", "ours_graphed", "pretrain",
                     "pretrain_graphed"):
            ms = {r["dtype"]: r["ms_median"] for r in rows
                  if r["variant"] == v and r["impl"] == impl}
            if "fp32" in ms and "bf16" in ms:
                key = f"{impl}_fp32_over_{impl}_bf16_ms"
                res.add("ratios", {"variant": v, key: ms["fp32"] / ms["bf16"]})
                log(f"{v}: {impl} fp32 / {impl} bf16 = {ms['fp32'] / ms['bf16']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="images 64x96, crops 32 (CPU sizes)")
    ap.add_argument("--quick", action="store_true", help="1 warm-up, 3 timed steps")
    ap.add_argument("--check", action="store_true",
                    help="first run the parity checks of the fast paths (bench/gpu_checks.py)")
    ap.add_argument("--only-check", action="store_true", help="parity checks only")
    ap.add_argument("--out", default=None, help="JSON file, rewritten after each measurement")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dtypes", default=None, help="default fp32,bf16 (CUDA) / fp32 (CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hf-backbone", default="transformers", choices=["transformers", "timm"])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-pretrain", action="store_true")
    ap.add_argument("--no-pretrain-2x", action="store_true",
                    help="skip the former per-direction pretraining path")
    ap.add_argument("--size", default=None,
                    help="images HxW (default 800x1088; --small: 64x96)")
    ap.add_argument("--graphed", action="store_true",
                    help="CUDA: also time our fine-tuning and pretraining steps with "
                         "engine.cuda_graphs (the dense part from CUDA graphs)")
    ap.add_argument("--fold-ab", action="store_true",
                    help="with --graphed: also the graphed steps with model.backbone."
                         "fold_frozen_bn=false (rows *_unfolded)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="with --graphed: also the graphed steps captured with "
                         "torch.backends.cudnn.benchmark on (rows *_graphed_cudnn)")
    ap.add_argument("--losses-ab", action="store_true",
                    help="with --graphed: also the graphed steps with their losses after "
                         "the matching eager (rows pretrain_graphed_dense_only, "
                         "ours_graphed_dense_only)")
    ap.add_argument("--augment-on-device", action="store_true",
                    help="also time the pretraining step on the loader output of "
                         "augment_on=device (crops cut, crops and views coloured in the step)")
    ap.add_argument("--fused-conv", action="store_true",
                    help="with --graphed: also the graphed steps with model.backbone."
                         "fused_conv_relu (cuDNN's fused convolutions for the frozen units), "
                         "alone and with channels_last (*_graphed_fused, *_graphed_cl_fused)")
    ap.add_argument("--channels-last", action="store_true",
                    help="also time our step with the backbone in channels_last (and, with "
                         "--graphed, the graphed pretraining step: pretrain_graphed_cl)")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: profile one step of ours/pretrain/hf (GPU busy share, kernels)")
    ap.add_argument("--compile", action="store_true",
                    help="also time our step with engine.compile (first steps compile: give "
                         "--warmup 3 or more)")
    args = ap.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.size = parse_size(args.size or ("64x96" if args.small else "800x1088"))
    args.crop = 32 if args.small else None
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or args.small else 2)
    args.steps = args.steps if args.steps is not None else (
        1 if args.small else 3 if args.quick else 6)
    dtypes = args.dtypes.split(",") if args.dtypes else (
        ["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)

    meta: dict[str, Any] = {
        "argv": sys.argv, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(), "tf32_matmul": False,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32, "size_hw": list(args.size),
        "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "dtypes": dtypes,
        "hf_backbone": args.hf_backbone,
        "note": "times on a CPU or a shared machine are not results; ops/syncs are counts",
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
        args.no_hf = True
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    res = Results(args.out, meta)
    log(json.dumps(meta))

    if args.check or args.only_check:
        sys.path.insert(0, str(Path(__file__).parent))
        import gpu_checks

        for item in gpu_checks.run_all(device):
            res.add("checks", item)
            log(f"check {item['name']}: ok={item.get('ok')} {item.get('result')}")
        if args.only_check:
            return
    for variant in args.variants.split(","):
        try:
            run_variant(variant, dtypes, args, device, res)
        except Exception as e:  # keep measuring the other variants
            res.add("errors", {"variant": variant, "error": repr(e),
                               "traceback": traceback.format_exc()})
            log(f"!! {variant} failed: {e!r}")
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bf16_vs_fp32(res)
    banned = sorted(m for m in ("cv2", "pycocotools") if sys.modules.get(m) is not None)
    res.data["meta"]["heavy_imports"] = banned
    res.flush()
    log(f"imports of cv2/pycocotools on this path: {banned or 'none'}")


if __name__ == "__main__":
    main()
