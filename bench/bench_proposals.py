"""Benchmark offline proposals: images/s per process and store random-access reads.

Usage: ``python bench/bench_proposals.py [--repeats 5] [--store-images 20000]``

* per-process throughput (one OpenCV thread, JPEG decode included) of each method on a
  500x375 photo (ImageNet's typical size) at its original resolution (the original tool's
  setting, ``working_size=0``) and on a 683x512 photo shrunk to 512 px (our default);
* the end-to-end generator (``generate_proposals``) with 1 and 2 worker processes;
* random-access read throughput of a synthetic store (N images x 512 int16 boxes);
* the projected wall time for ImageNet-1k (1,281,167 images) on a 64-core node, assuming
  linear scaling over cores (one process per core).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data

from siamese_detr.data.sources import ImageRecord
from siamese_detr.proposals.generate import ProposalSettings, generate_proposals, process_record
from siamese_detr.proposals.store import StoreWriter

IMAGENET_IMAGES = 1_281_167
NODE_CORES = 64


def _photo(folder: Path, name: str, w: int, h: int) -> Path:
    path = folder / f"{name}_{w}x{h}.jpg"
    Image.fromarray(getattr(data, name)()).resize((w, h), Image.BICUBIC).save(path, quality=90)
    return path


def _rate(path: Path, settings: ProposalSettings, repeats: int) -> tuple[float, int]:
    record = ImageRecord(path.name, path)
    result, reason = process_record(record, settings)  # warm-up (SED/model caches, imports)
    assert result is not None, reason
    start = time.perf_counter()
    for _ in range(repeats):
        result, _ = process_record(record, settings)
    return repeats / (time.perf_counter() - start), len(result.boxes)  # type: ignore[union-attr]


def bench_methods(folder: Path, repeats: int) -> None:
    cv2.setNumThreads(1)
    cases = [("500x375 original size", _photo(folder, "astronaut", 500, 375), 0),
             ("683x512 at 512 px", _photo(folder, "coffee", 683, 512), 512)]
    runs = [("edgeboxes", {}), ("selective-search", {"ss_mode": "fast"}), ("random", {})]
    print(f"{'method':<18} {'image':<24} {'img/s/proc':>10} {'boxes':>6} "
          f"{'ImageNet-1k on 64 cores':>24}")
    for label, path, size in cases:
        for method, extra in runs:
            settings = ProposalSettings(method=method, working_size=size, **extra)
            rate, boxes = _rate(path, settings, repeats if method != "random" else 50)
            hours = IMAGENET_IMAGES / (rate * NODE_CORES) / 3600
            print(f"{method:<18} {label:<24} {rate:>10.2f} {boxes:>6} {hours:>22.2f} h")
    settings = ProposalSettings(method="selective-search", working_size=128)
    rate, boxes = _rate(cases[0][1], settings, repeats)
    hours = IMAGENET_IMAGES / (rate * NODE_CORES) / 3600
    print(f"{'selective-search':<18} {'500x375 at 128 px':<24} {rate:>10.2f} {boxes:>6} "
          f"{hours:>22.2f} h   (the original's disabled SS path)")


def bench_generator(folder: Path, images: int) -> None:
    src = folder / "images"
    src.mkdir()
    base = Image.open(_photo(folder, "chelsea", 500, 375))
    for i in range(images):  # distinct content: shifted crops
        base.transform((500, 375), Image.AFFINE, (1, 0, i * 3, 0, 1, i * 2)).save(
            src / f"{i:04d}.jpg", quality=90)
    for workers in (1, 2):
        start = time.perf_counter()
        summary = generate_proposals(src, folder / f"store_w{workers}", workers=workers,
                                     chunk_size=8, working_size=0, progress=False)
        seconds = time.perf_counter() - start
        print(f"generate_proposals edgeboxes, {images} images 500x375, workers={workers}: "
              f"{seconds:.1f} s wall, {summary.images_done / seconds:.2f} img/s "
              "(incl. pool start-up)")


def bench_store(folder: Path, n_images: int, boxes_per_image: int = 512) -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    writer = StoreWriter(folder / "synthetic", chunk_size=1000, plan={"method": "synthetic"})
    xy = rng.integers(0, 400, size=(boxes_per_image, 2))
    wh = rng.integers(1, 100, size=(boxes_per_image, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = np.sort(rng.random(boxes_per_image).astype(np.float32))[::-1]
    for i in range(n_images):
        writer.add(f"train/n{i % 1000:08d}/img_{i:07d}.JPEG", boxes, scores, (500, 500))
    store = writer.close()
    print(f"synthetic store: {n_images} images x {boxes_per_image} boxes written in "
          f"{time.perf_counter() - start:.1f} s")
    ids = list(store.ids())
    picks = rng.permutation(len(ids))[: min(20000, len(ids))]
    for top_k in (None, 100):
        start = time.perf_counter()
        total = 0
        for j in picks:
            total += len(store.get(ids[j], top_k=top_k)[0])
        seconds = time.perf_counter() - start
        print(f"random access get(top_k={top_k}): {len(picks) / seconds:,.0f} images/s, "
              f"{total / seconds:,.0f} boxes/s (one process, warm page cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store-images", type=int, default=20000)
    parser.add_argument("--generator-images", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench_methods(folder, args.repeats)
        bench_generator(folder, args.generator_images)
        bench_store(folder, args.store_images)


if __name__ == "__main__":
    main()
