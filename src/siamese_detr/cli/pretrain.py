"""``siamese-detr pretrain``: self-supervised pretraining of a detector's transformer."""

from __future__ import annotations

import argparse
from pathlib import Path

from siamese_detr.cli.common import add_config_arguments, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="Siamese DETR pretraining on unlabeled images + offline proposals",
        description="Pretrain the transformer of a DETR-family detector with Siamese DETR "
        "(Multi-View Region Detection + Multi-View Semantic Discrimination) on a frozen "
        "backbone. Paper recipes: --preset siamese/<detector>/<data>; multi-GPU: "
        "torchrun --nproc-per-node 8 -m siamese_detr pretrain --preset ... The checkpoint "
        "(OUT/last.pt) fine-tunes directly: siamese-detr finetune --init OUT/last.pt.")
    add_config_arguments(p, "tiny/conditional/siamese")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue exactly from a checkpoint (default: OUT/last.pt)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from siamese_detr.engine.distributed import cleanup, init_distributed
    from siamese_detr.engine.logging import setup_logging
    from siamese_detr.pretrain import run_pretrain

    cfg = config_from_args(args, "pretrain")
    info = init_distributed(cfg.engine.device)
    run_dir = Path(cfg.output_dir)
    setup_logging(info.is_main, run_dir / "log.txt")
    resume_path = None
    if args.resume:
        resume_path = str(run_dir / "last.pt") if args.resume == "auto" else args.resume
    try:
        metrics = run_pretrain(cfg, info, resume_path)
    finally:
        cleanup()
    if info.is_main:
        print("final losses: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                           if k.startswith("loss")))
        print(f"checkpoint: {run_dir / 'last.pt'}  (fine-tune with --init)")
    return 0
