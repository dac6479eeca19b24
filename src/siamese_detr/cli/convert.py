"""``siamese-detr convert``: our checkpoint -> upstream DETR / Conditional DETR / Deformable
DETR layout, saved as ``{"model": state_dict}``."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from siamese_detr.cli.main import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    from siamese_detr.convert import TARGETS

    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to an upstream repository's layout",
        description="Convert a pretraining or fine-tuning checkpoint to the key layout of "
        "facebookresearch/detr, Atten4Vis/ConditionalDETR or fundamentalvision/Deformable-DETR. "
        "Exits 1 when keys are left unmapped (unless --allow-unmapped).",
    )
    p.add_argument("--checkpoint", required=True, help="our checkpoint (.pt)")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), dest="target")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--allow-unmapped", action="store_true",
                   help="write the file even if some keys could not be mapped")
    p.add_argument("--keep-class-embed", action="store_true",
                   help="keep the class head of a pretraining checkpoint (dropped by default)")
    p.set_defaults(func=run)


def _atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    from siamese_detr.convert import ConversionError, convert_checkpoint, wrap_upstream

    src = Path(args.checkpoint)
    if not src.is_file():
        raise UserError(f"--checkpoint {str(src)!r} does not exist")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with non-tensor objects, ...
        raise UserError(f"cannot read {str(src)!r}: {exc}") from exc
    try:
        state, report = convert_checkpoint(
            ckpt, args.target, keep_class_embed=True if args.keep_class_embed else None
        )
    except ConversionError as exc:
        raise UserError(str(exc)) from exc
    print(f"{src} -> {args.target}")
    print(report.summary())
    if not report.ok and not args.allow_unmapped:
        print(f"not written: {len(report.unmapped)} unmapped key(s) "
              "(re-run with --allow-unmapped to write anyway)")
        return 1
    out = Path(args.out)
    _atomic_save(wrap_upstream(state), out)
    print(f"wrote {out}")
    return 0
