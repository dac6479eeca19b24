"""``siamese-detr convert``: our checkpoint -> upstream DETR / Conditional DETR / Deformable
DETR layout, saved as ``{"model": state_dict}``."""

from __future__ import annotations

import argparse
from pathlib import Path

from siamese_detr.errors import UserError

# the keys of siamese_detr.convert.TARGETS, listed here so that `--help` does not import torch
# (tests/unit/test_layout.py checks that both agree)
TARGET_NAMES = ("conditional-detr", "deformable-detr", "detr")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to an upstream repository's layout",
        description="Convert a pretraining or fine-tuning checkpoint to the key layout of "
        "facebookresearch/detr, Atten4Vis/ConditionalDETR or fundamentalvision/Deformable-DETR. "
        "Exits 1 when keys are left unmapped (unless --allow-unmapped).",
    )
    p.add_argument("--checkpoint", required=True, help="our checkpoint (.pt)")
    p.add_argument("--to", required=True, choices=TARGET_NAMES, dest="target")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--allow-unmapped", action="store_true",
                   help="write the file even if some keys could not be mapped")
    p.add_argument("--keep-class-embed", action="store_true",
                   help="keep the class head of a pretraining checkpoint (dropped by default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from siamese_detr.convert import ConversionError, convert_checkpoint, wrap_upstream
    from siamese_detr.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(args.checkpoint)  # safe load; one-line error on a bad file
    try:
        state, report = convert_checkpoint(
            ckpt, args.target, keep_class_embed=True if args.keep_class_embed else None
        )
    except ConversionError as exc:
        raise UserError(str(exc)) from exc
    print(f"{args.checkpoint} -> {args.target}")
    print(report.summary())
    if not report.ok and not args.allow_unmapped:
        print(f"not written: {len(report.unmapped)} unmapped key(s) "
              "(re-run with --allow-unmapped to write anyway)")
        return 1
    out = Path(args.out)
    save_checkpoint(wrap_upstream(state), out)
    print(f"wrote {out}")
    return 0
