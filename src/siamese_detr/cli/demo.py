"""``siamese-detr demo``: the whole pipeline at toy scale on bundled data, with a report."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from siamese_detr.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run proposals -> pretraining -> fine-tuning -> evaluation at toy scale",
        description="Generate toy data from photos shipped with scikit-image, compute EdgeBoxes "
        "proposals, pretrain with Siamese DETR, fine-tune from scratch and from the pretrained "
        "checkpoint, evaluate both (COCO AP) and write OUT/report.md. Re-running continues an "
        "interrupted demo.")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--minutes", type=float, default=None,
                   help="approximate time budget on 2 CPU cores (default: the full plan, "
                        "about 11.5); training iterations scale with it")
    p.add_argument("--variant", choices=["vanilla", "conditional", "deformable"],
                   default="deformable",
                   help="detector (default: deformable, 2 levels: it learns fastest on CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="data seed; fine-tuning seeds are SEED, SEED+1, ... (default: 0)")
    p.add_argument("--finetune-seeds", type=int, default=None, metavar="N",
                   help="fine-tuning runs per arm, the AP reported is their mean (default: 3; "
                        "on CPU they run side by side, one thread each)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where every stage runs (default: auto = the GPU when one is present)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from siamese_detr.demo.demo import DEFAULT_MINUTES, DemoPlan, results_table, run_demo
    from siamese_detr.demo.report import plan_seeds, results_lines
    from siamese_detr.engine.logging import setup_logging

    out = Path(args.out)
    setup_logging(True, out / "demo.log")
    minutes = DEFAULT_MINUTES if args.minutes is None else args.minutes
    plan = DemoPlan.scaled(minutes, args.variant, args.seed, args.device)
    if args.finetune_seeds is not None:
        if args.finetune_seeds < 1:
            raise UserError(f"--finetune-seeds must be at least 1, got {args.finetune_seeds}")
        plan = replace(plan, finetune_seeds=args.finetune_seeds)
    report = run_demo(out, plan)
    print(f"\nreport: {report}")
    print("\n".join(results_lines(results_table(out, plan_seeds(plan)))))
    return 0
