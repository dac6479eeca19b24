"""Benchmark ``predict``: images/s of each tiny detector on the CPU.

Usage: ``python bench/bench_predict.py [--images 16] [--rounds 3] [--batch-size 4]
[--threads 1]``

For each variant (tiny presets, seeded random weights saved as a fine-tuning checkpoint with
category names) on the same real photos (scikit-image astronaut / coffee / chelsea, 512 px):

* ``api``: ``load_detector(...).predict(paths)`` (decode, resize to ``data.val_size``,
  forward, post-process);
* ``cli``: ``siamese-detr predict`` in-process (the above plus loading the checkpoint once,
  drawing and writing one PNG per image and the json files).

Variants are interleaved round by round, so a shared machine's load hits them alike; the median
over rounds is printed. Wall-clock numbers: state the machine and its load with them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from siamese_detr.cli.main import main
from siamese_detr.configio import to_dict
from siamese_detr.eval.loading import load_detector
from siamese_detr.models.detector import build_detector_from_config
from siamese_detr.presets import get_preset

VARIANTS = ("vanilla", "conditional", "deformable")
CATEGORIES = [{"id": 0, "name": "face"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "cup"}]


def _checkpoint(path: Path, variant: str) -> Path:
    cfg = get_preset(f"tiny/{variant}/finetune")
    torch.manual_seed(0)
    detector = build_detector_from_config(cfg)
    torch.save({"kind": "finetune", "step": 0, "config": to_dict(cfg), "categories": CATEGORIES,
                "model": {f"detector.{k}": v for k, v in detector.state_dict().items()}}, path)
    return path


def _photos(folder: Path, n: int) -> list[Path]:
    sources = [data.astronaut(), data.coffee()[:, 44:556], data.chelsea()]
    paths = []
    for k in range(n):
        array = np.asarray(Image.fromarray(sources[k % 3]).resize((512, 512)))
        paths.append(folder / f"photo_{k:03d}.jpg")
        Image.fromarray(array).save(paths[-1], quality=92)
    return paths


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = _photos(root, args.images)
        ckpts = {v: _checkpoint(root / f"{v}.pt", v) for v in VARIANTS}
        loaded = {v: load_detector(ckpts[v], "cpu") for v in VARIANTS}
        for v in VARIANTS:  # warm-up
            loaded[v].predict(photos[:2], batch_size=2)
        rates: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for v in VARIANTS:
                t0 = time.perf_counter()
                loaded[v].predict(photos, score_threshold=0.3, batch_size=args.batch_size)
                rates.setdefault((v, "api"), []).append(len(photos) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    rc = main(["predict", str(ckpts[v]), *map(str, photos), "--out",
                               str(root / f"out_{v}_{r}"), "--device", "cpu",
                               "--batch-size", str(args.batch_size), "--no-progress"])
                assert rc == 0
                rates.setdefault((v, "cli"), []).append(len(photos) / (time.perf_counter() - t0))
    print(f"predict on CPU, {args.images} photos 512x512 (resized to data.val_size), batch "
          f"{args.batch_size}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'variant':<12} {'api img/s':>10} {'cli img/s':>10}")
    for v in VARIANTS:
        print(f"{v:<12} {statistics.median(rates[(v, 'api')]):>10.2f} "
              f"{statistics.median(rates[(v, 'cli')]):>10.2f}")


if __name__ == "__main__":
    main_bench()
