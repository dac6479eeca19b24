"""``siamese-detr evaluate``: COCO AP / VOC AP50 of a fine-tuned checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a fine-tuned checkpoint (COCO AP, VOC AP50)",
        description="Evaluate a fine-tuning checkpoint on a COCO-format set. The model is "
        "rebuilt from the config stored in the checkpoint; data keys may be overridden.")
    p.add_argument("--checkpoint", required=True, help="fine-tuning checkpoint (last.pt)")
    p.add_argument("--metric", choices=["coco", "voc07", "voc-area"], default=None,
                   help="coco = AP@[.5:.95] (always reported); voc07 = VOC2007 11-point AP50; "
                        "voc-area = area under the PR curve AP50")
    p.add_argument("--images", default=None, help="image folder (default: from checkpoint)")
    p.add_argument("--ann", default=None, help="COCO-format json (default: from checkpoint)")
    p.add_argument("--predictions", default=None,
                   help="write the COCO results json here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from siamese_detr.configio import apply_overrides, from_dict
    from siamese_detr.engine.checkpoint import load_checkpoint
    from siamese_detr.engine.distributed import init_distributed
    from siamese_detr.errors import ConfigError
    from siamese_detr.eval.detection import describe_metrics, predict, score
    from siamese_detr.eval.loading import load_detector
    from siamese_detr.files import write_json
    from siamese_detr.methods.supervised import build_datasets

    ckpt = load_checkpoint(args.checkpoint)
    if not isinstance(ckpt.get("config"), dict):
        raise ConfigError(f"{args.checkpoint} has no stored config: evaluate a checkpoint "
                          "written by `siamese-detr finetune`")
    cfg = apply_overrides(from_dict(ckpt["config"]), args.overrides)
    del ckpt
    data = cfg.data
    if args.images:
        data = replace(data, val_images=args.images)
    if args.ann:
        data = replace(data, val_ann=args.ann)
    cfg = replace(cfg, data=data, eval=replace(cfg.eval, metric=args.metric or cfg.eval.metric))
    info = init_distributed(cfg.engine.device)
    _, val_set = build_datasets(cfg, train=False)
    detector = load_detector(args.checkpoint, info.device).detector
    with torch.no_grad():
        results = predict(detector, val_set, cfg, info.device)
    metrics = score(results, val_set, cfg.eval.metric)
    if args.predictions:
        write_json(Path(args.predictions), results)
    print(describe_metrics(metrics))
    return 0
