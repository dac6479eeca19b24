"""``siamese-detr finetune``: supervised fine-tuning (from scratch or from a checkpoint)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from siamese_detr.cli.common import (
    add_config_arguments,
    add_run_folder_arguments,
    config_from_args,
    run_training,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a detector on a COCO-format data set and evaluate it",
        description="Fine-tune a DETR-family detector on a COCO-format data set (COCO, or VOC "
        "converted with `siamese-detr voc2coco`) and report COCO AP (and VOC AP50 with "
        "eval.metric=voc07|voc-area). Without --init the transformer starts from scratch. "
        "Multi-GPU: torchrun --nproc-per-node N -m siamese_detr finetune ...")
    add_config_arguments(p, "tiny/conditional/finetune")
    p.add_argument("--init", default=None,
                   help="checkpoint to start from: a `siamese-detr pretrain` checkpoint (no "
                        "conversion needed), a fine-tuning checkpoint or a converted file")
    add_run_folder_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from siamese_detr.eval.detection import describe_metrics

    cfg = config_from_args(args, "finetune")
    if args.init:
        cfg = replace(cfg, init=args.init)
    metrics, is_main = run_training(cfg, args.resume, args.overwrite)
    if is_main:
        print(describe_metrics(metrics))
    return 0
