"""``siamese-detr voc2coco``: PASCAL VOC devkit -> one COCO-format json."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> int:
    from siamese_detr.data.voc import convert_voc, parse_set

    sets = [parse_set(s) for s in args.sets]
    data = convert_voc(args.devkit, sets, args.out, args.box_convention)
    print(f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} boxes "
          f"({sum(a['difficult'] for a in data['annotations'])} difficult), 20 categories "
          f"(ids 0..19); image root = {args.devkit}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "voc2coco",
        help="convert a PASCAL VOC devkit to COCO-format json",
        description="Convert PASCAL VOC (VOCdevkit/VOC<year>/{Annotations,JPEGImages,"
        "ImageSets/Main}) to one COCO-format json with category ids 0..19. file_name is "
        "relative to the devkit folder; boxes are 0-based continuous "
        "[xmin-1, ymin-1, xmax-xmin+1, ymax-ymin+1]; difficult objects are kept with "
        "'difficult' and 'ignore' flags.",
    )
    parser.add_argument("--devkit", required=True, help="the VOCdevkit folder")
    parser.add_argument("--sets", nargs="+", required=True, metavar="YEAR:SPLIT",
                        help="e.g. 2007:trainval 2012:trainval (merged), or 2007:test")
    parser.add_argument("--out", required=True, help="output json file")
    parser.add_argument("--box-convention", choices=("ours", "official"), default="ours",
                        help="ours: [xmin-1, ymin-1, xmax-xmin+1, ymax-ymin+1] (default); "
                        "official: [xmin, ymin, xmax-xmin, ymax-ymin] as in the official "
                        "Siamese DETR json (the */voc12 presets)")
    parser.set_defaults(func=run)
    return parser
