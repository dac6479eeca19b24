"""``siamese-detr pretrain``: self-supervised pretraining of a detector's transformer."""

from __future__ import annotations

import argparse
from pathlib import Path

from siamese_detr.cli.common import (
    add_config_arguments,
    add_run_folder_arguments,
    config_from_args,
    run_training,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="self-supervised pretraining on unlabeled images + offline proposals",
        description="Pretrain the transformer of a DETR-family detector on a frozen backbone "
        "with Siamese DETR (Multi-View Region Detection + Multi-View Semantic Discrimination). "
        "Paper recipes: --preset siamese/<detector>/<data>; the baselines: UP-DETR (random "
        "query patches, no proposals) --preset updetr/<detector>/<data>, DETReg (top-k "
        "proposals as targets + embedding distillation) --preset detreg/<detector>/<data>; "
        "multi-GPU: "
        "torchrun --nproc-per-node 8 -m siamese_detr pretrain --preset ... The checkpoint "
        "(OUT/last.pt) fine-tunes directly: siamese-detr finetune --init OUT/last.pt.")
    add_config_arguments(p, "tiny/conditional/siamese")
    add_run_folder_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "pretrain")
    metrics, is_main = run_training(cfg, args.resume, args.overwrite)
    if is_main:
        print("final losses: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                           if k.startswith("loss")))
        print(f"checkpoint: {Path(cfg.output_dir) / 'last.pt'}  (fine-tune with --init)")
    return 0
