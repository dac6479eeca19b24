"""``siamese-detr proposals``: offline region proposals into a proposal store.

Verbs: ``run SOURCE --out STORE`` (also ``proposals SOURCE --out STORE``), ``merge STORE``,
``show STORE IMAGE_ID --out x.png``, ``stats STORE``. The verb's arguments are parsed by a
parser of this module, so the top-level parser only routes ``proposals ...`` here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from siamese_detr.errors import UserError

VERBS = ("run", "merge", "show", "stats")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "proposals", add_help=False,
        help="offline region proposals (EdgeBoxes, Selective Search) into a proposal store",
        description="Verbs: run | merge | show | stats (`siamese-detr proposals run -h`).",
    )
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_dispatch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siamese-detr proposals",
        description="Offline region proposals over an image folder, list file or COCO json, "
        "parallel, sharded and resumable. `proposals SOURCE --out STORE` means `run`.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = verbs.add_parser("run", help="compute proposals (resumes a killed run)")
    run.add_argument("source", help="image folder, list file (one path per line) or COCO json")
    run.add_argument("--out", required=True, help="store directory")
    run.add_argument("--method", default="edgeboxes",
                     choices=("edgeboxes", "selective-search", "random"))
    run.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    run.add_argument("--shard", default=None,
                     help="I/N: this process's share (default: RANK/WORLD_SIZE or "
                     "SLURM_PROCID/SLURM_NTASKS, else 0/1)")
    run.add_argument("--max-boxes", type=int, default=512)
    run.add_argument("--edge-model", default=None,
                     help="OpenCV structured-edge model (model.yml.gz); default: gradient edges")
    run.add_argument("--working-size", type=int, default=512,
                     help="shrink images whose longest side is larger (0: original size)")
    run.add_argument("--images-root", default=None,
                     help="images folder of a list file or COCO json")
    run.add_argument("--chunk-size", type=int, default=256, help="images per resumable part")
    run.add_argument("--ss-mode", default="fast", choices=("fast", "quality"))
    run.add_argument("--seed", type=int, default=0,
                     help="seed of --method random and of selective search's region ranking")
    run.add_argument("--no-progress", action="store_true")
    merge = verbs.add_parser("merge", help="finalise a store once all shards are done")
    merge.add_argument("store")
    show = verbs.add_parser("show", help="draw an image's top proposals into a PNG")
    show.add_argument("store")
    show.add_argument("image_id")
    show.add_argument("--out", required=True)
    show.add_argument("--top", type=int, default=20)
    stats = verbs.add_parser("stats", help="coverage and box statistics of a store")
    stats.add_argument("store")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    parser = build_parser()
    if args.help or not argv:
        parser.print_help()
        return 0 if args.help else 2
    if argv[0] not in VERBS and not argv[0].startswith("-"):
        argv.insert(0, "run")
    inner = parser.parse_args(argv)
    return {"run": _run, "merge": _merge, "show": _show, "stats": _stats}[inner.verb](inner)


def _run(args: argparse.Namespace) -> int:
    from siamese_detr.proposals.generate import generate_proposals

    summary = generate_proposals(
        args.source, args.out, method=args.method, workers=args.workers, shard=args.shard,
        chunk_size=args.chunk_size, max_boxes=args.max_boxes, edge_model=args.edge_model,
        working_size=args.working_size, images_root=args.images_root, ss_mode=args.ss_mode,
        seed=args.seed, progress=not args.no_progress,
    )
    for line in summary.lines():
        print(line)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from siamese_detr.proposals.store import finalize_store

    meta = finalize_store(args.store)
    print(f"store {args.store}: {meta['num_images']} images, {meta['num_skipped']} skipped, "
          f"{meta['num_boxes']} boxes")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from siamese_detr.proposals.store import ProposalStore

    store = ProposalStore.open(args.store)
    try:
        stats = store.stats()
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"proposal store {args.store} is damaged ({type(exc).__name__}: {exc});"
                        " rebuild it with `siamese-detr proposals run`") from None
    if args.json:
        print(json.dumps(stats, sort_keys=True))
        return 0
    bpi = stats["boxes_per_image"]
    print(f"store: {args.store} (method {store.meta.get('method', '?')})")
    print(f"images: {stats['images']}, skipped: {stats['skipped']}, boxes: {stats['boxes']}")
    print(f"boxes per image: min {bpi['min']} / median {bpi['median']:g} / "
          f"mean {bpi['mean']:g} / max {bpi['max']}")
    print(f"mean box size: {stats['mean_box_width']:g} x {stats['mean_box_height']:g} px, "
          f"sqrt(area) / sqrt(image area) {stats['mean_relative_size']:g} "
          f"(over {stats['sampled_images']} images)")
    for image_id, reason in list(store.meta.get("failures", {}).items())[:10]:
        print(f"skipped {image_id}: {reason}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from PIL import ImageDraw

    from siamese_detr.data.images import load_rgb
    from siamese_detr.data.sources import find_image
    from siamese_detr.proposals.store import ProposalStore

    store = ProposalStore.open(args.store)
    if args.image_id not in store:
        reason = store.meta.get("failures", {}).get(args.image_id)
        raise UserError(f"image id {args.image_id!r} is not in {args.store}"
                        + (f" (skipped: {reason})" if reason else ""))
    source = store.meta.get("source") or {}
    if not source.get("path"):
        raise UserError(f"{args.store} does not record its image source")
    path = find_image(source["path"], args.image_id, source.get("images_root"))
    try:
        boxes, scores = store.get(args.image_id, top_k=args.top)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"proposal store {args.store} is damaged ({type(exc).__name__}: {exc});"
                        " rebuild it with `siamese-detr proposals run`") from None
    canvas = load_rgb(path)
    draw = ImageDraw.Draw(canvas)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230)]
    for rank, box in reversed(list(enumerate(boxes.tolist()))):
        draw.rectangle(box, outline=palette[rank % len(palette)], width=2 if rank else 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    print(f"{len(boxes)} proposals of {args.image_id} drawn into {out}"
          + (f" (best score {scores[0]:.3f})" if len(scores) else ""))
    return 0
