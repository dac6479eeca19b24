"""Data-loader throughput: samples/s per worker for the fine-tuning and pretraining data sets.

Builds the demo-sized toy data with the synthetic generator (and EdgeBoxes proposals) in a
temporary folder, then times the per-sample work one loader worker does (``dataset[i]`` +
collation, in this process, so the figure is per worker) for:

* ``finetune``: COCO-format detection set with the tiny preset's transforms;
* ``pretrain/tiny``: Siamese views of the tiny preset (5 regions, 64 px crops);
* ``pretrain/paper``: the paper options (10 regions, 128 px crops, base resize 320-480);
* ``pretrain/paper, float``: the same samples normalised to float32 in the worker, as before
  workers sent uint8 (the batch is now normalised on the training device);
* ``detreg/paper``, ``updetr/paper`` (and ``, augment on device``): the baselines' loaders
  with their paper options (DETReg: 30 crops of 128 px per image; UP-DETR: 10 patches);
* ``pretrain/paper, augment on device``: ``augment_on=device``, the colour pipelines and the
  region crops left to the training device (what ``auto`` picks on a GPU): the worker sends
  un-coloured views and the parameters it drew; the other rows use ``augment_on=worker``.
  Its worker sends the outer view rectangle once and the device renders both views
  (``view_resize_on=device``, the default); ``..., views resized in the worker`` has PIL
  resize them in the worker, as before session 7. ``..., batch copied to shm`` is the same
  with the padded batch built in private memory and copied into shared memory when sent, as
  before the collate built it there directly.

A worker's work includes handing the batch to the main process: collation plus the pickling
that moves its tensors into shared memory (``ForkingPickler``), so the bytes a sample weighs
count; they are printed too.

``--workers N`` also runs the real loader (``build_detection_loader``, N persistent workers)
and prints its samples/s. On a shared machine only ratios measured in one process mean
anything.

    python bench/bench_loader.py [--images 48] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siamese_detr.config import SiameseOptions
from siamese_detr.presets import get_preset


def build_data(root: Path, n: int, size: int) -> dict[str, Any]:
    from siamese_detr.demo.synthetic import make_detection_set, make_unlabeled_set
    from siamese_detr.proposals.generate import generate_proposals

    det = make_detection_set(root / "det", n_train=n, n_val=4, image_size=(size, size), seed=0)
    make_unlabeled_set(root / "unlabeled", n=n, image_size=(size, size), seed=1)
    generate_proposals(root / "unlabeled", root / "proposals", method="edgeboxes", workers=1,
                       chunk_size=64, progress=False)
    return {"det": det, "unlabeled": root / "unlabeled", "proposals": root / "proposals"}


def prepared_data(root: Path, n: int, size: int) -> dict[str, Any]:
    """``build_data`` once per folder: a ``ready.json`` marks a complete build (images, COCO
    files, proposals) for this ``n`` and ``size``; otherwise the folder is built again."""
    import json

    from siamese_detr.demo.synthetic import DetectionSetPaths

    marker = root / "ready.json"
    want = {"images": n, "size": size}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        det = DetectionSetPaths(root=root / "det", train_images=root / "det" / "train",
                           train_ann=root / "det" / "train.json",
                           val_images=root / "det" / "val", val_ann=root / "det" / "val.json")
        return {"det": det, "unlabeled": root / "unlabeled", "proposals": root / "proposals"}
    data = build_data(root, n, size)
    marker.write_text(json.dumps(want))
    return data


def finetune_set(data: dict[str, Any], size: int) -> Any:
    from siamese_detr.data.coco import CocoDetection
    from siamese_detr.data.transforms import build_transforms

    cfg = get_preset("tiny/deformable/finetune")
    d = replace(cfg.data, train_scales=(size,), val_size=size)
    det = data["det"]
    return CocoDetection(det.train_images, det.train_ann, build_transforms(d, train=True),
                         num_classes=cfg.model.num_classes)


def pretrain_set(data: dict[str, Any], opts: SiameseOptions) -> Any:
    from siamese_detr.data.sources import list_images
    from siamese_detr.methods.siamese.data import PretrainDataset
    from siamese_detr.proposals.store import ProposalStore

    return PretrainDataset(list_images(data["unlabeled"]), ProposalStore.open(data["proposals"]),
                           opts, seed=0)


class FloatViews:
    """A Siamese data set whose samples are normalised to float32 in the worker (the former
    loader output), for the comparison."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        from siamese_detr.methods.siamese.views import normalise_uint8

        s = self.dataset[key]
        if s is None or s.deferred is not None:
            return s
        return replace(s, view1=normalise_uint8(s.view1), view2=normalise_uint8(s.view2),
                       crops1=None if s.crops1 is None else normalise_uint8(s.crops1),
                       crops2=None if s.crops2 is None else normalise_uint8(s.crops2))


def baseline_set(data: dict[str, Any], method: str, augment_on: str) -> tuple[Any, Callable]:
    """The DETReg or UP-DETR data set of the toy images, paper options."""
    from siamese_detr.config import DETRegOptions, UPDETROptions
    from siamese_detr.data.sources import list_images
    from siamese_detr.methods.detreg.data import DETRegDataset, collate_detreg
    from siamese_detr.methods.updetr.data import UPDETRDataset, collate_updetr
    from siamese_detr.proposals.store import ProposalStore

    records = list_images(data["unlabeled"])
    if method == "detreg":
        store = ProposalStore.open(data["proposals"])
        return (DETRegDataset(records, store, DETRegOptions(augment_on=augment_on), seed=0),
                collate_detreg)
    return UPDETRDataset(records, UPDETROptions(augment_on=augment_on), seed=0), collate_updetr


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    return 0


def per_worker_rate(dataset: Any, collate: Callable, batch: int, start: int = 0,
                    in_worker: bool = True) -> tuple[float, float]:
    """(samples/s, MB per sample) of one worker: every sample of ``dataset`` once, collated
    in batches and pickled as a worker hands a batch over (tensors into shared memory).
    ``in_worker``: the collate functions believe they run in a loader worker, as they do
    there (they then build the batch in shared memory); False gives the former behaviour,
    a batch copied into shared memory when it is sent."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the shared-memory reducers)
    import torch.utils.data as tud

    real = tud.get_worker_info  # what our collate functions and default_collate read
    tud.get_worker_info = (lambda: "bench") if in_worker else (lambda: None)  # type: ignore
    try:
        n = len(dataset)
        size = 0
        t0 = time.perf_counter()
        for i in range(0, n - batch + 1, batch):
            collated = collate([dataset[(start + j) % n] for j in range(i, i + batch)])
            ForkingPickler.dumps(collated)
            size += _tensor_bytes(collated)
        done = n - n % batch
        return done / (time.perf_counter() - t0), size / done / 1e6
    finally:
        tud.get_worker_info = real


def loader_rate(dataset: Any, collate: Callable, batch: int, workers: int, steps: int,
                min_seconds: float = 2.0) -> float:
    """Samples/s of the real loader in its steady state: first ``2 * workers`` batches (every
    worker started and has delivered; before session 9 only the first batch was awaited, and
    with 4 workers the timed window was about 0.3 s, so the workers' start-up counted), then
    at least ``steps`` batches and ``min_seconds`` timed."""
    from siamese_detr.data.loaders import build_detection_loader

    it = build_detection_loader(dataset, batch, workers, seed=0, collate_fn=collate)
    for _ in range(2 * max(workers, 1)):
        next(it)
    n, t0 = 0, time.perf_counter()
    while n < steps or time.perf_counter() - t0 < min_seconds:
        next(it)
        n += 1
    return n * batch / (time.perf_counter() - t0)


COPIED = "pretrain/paper, augment on device, batch copied to shm"
RESIZED = "pretrain/paper, augment on device, views resized in the worker"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=160, help="toy image side (demo: 160)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None,
                    help="folder of the toy data: built there if missing, reused if present "
                         "(prepare it where EdgeBoxes is installed, read it where it is not)")
    ap.add_argument("--loader-batches", type=int, default=None,
                    help="batches timed through the real loader (default images/4, at least 4)")
    ap.add_argument("--prepare-only", action="store_true", help="build --data, then stop")
    ap.add_argument("--only", default=None,
                    help="names of the sets to measure, exact as printed, separated by |")
    args = ap.parse_args()
    from siamese_detr.data.collate import collate_detection
    from siamese_detr.methods.siamese.data import collate_siamese

    torch.set_num_threads(1)  # a loader worker runs one thread
    tiny = replace(get_preset("tiny/deformable/siamese").pretrain.siamese, augment_on="worker")
    paper = SiameseOptions(augment_on="worker")
    with tempfile.TemporaryDirectory() as tmp:
        data = prepared_data(args.data or Path(tmp), args.images, args.size)
        if args.prepare_only:
            print(f"toy data ready in {args.data}")
            return
        sets = {"finetune": (finetune_set(data, args.size), collate_detection),
                "pretrain/tiny": (pretrain_set(data, tiny), collate_siamese),
                "pretrain/paper": (pretrain_set(data, paper), collate_siamese),
                "pretrain/paper, float": (FloatViews(pretrain_set(data, paper)),
                                          collate_siamese),
                "pretrain/paper, augment on device": (
                    pretrain_set(data, replace(paper, augment_on="device")), collate_siamese),
                RESIZED: (pretrain_set(data, replace(paper, augment_on="device",
                                                     view_resize_on="worker")),
                          collate_siamese),
                **{f"{m}/paper{label}": baseline_set(data, m, where)
                   for m in ("detreg", "updetr")
                   for label, where in (("", "worker"), (", augment on device", "device"))}}
        sets[COPIED] = sets["pretrain/paper, augment on device"]  # measured the former way
        if args.only:
            wanted = [name.strip() for name in args.only.split("|")]
            unknown = [name for name in wanted if name not in sets]
            if unknown:
                raise SystemExit(f"--only: no set named {unknown[0]!r} (sets: "
                                 f"{', '.join(sets)})")
            sets = {name: sets[name] for name in wanted}
        print(f"{args.images} toy images of {args.size} px, batch 4, torch threads 1, "
              f"median of {args.rounds} rounds (shared machine: compare ratios only)")
        # rounds interleaved across the sets, so that a change of load hits all alike
        measured: dict[str, list[tuple[float, float]]] = {name: [] for name in sets}
        for r in range(args.rounds):
            for name, (ds, collate) in sets.items():
                measured[name].append(per_worker_rate(ds, collate, 4, start=r,
                                                      in_worker=name != COPIED))
        for name, (ds, collate) in sets.items():
            rate = float(np.median([m[0] for m in measured[name]]))
            line = (f"{name:62s} {rate:8.1f} samples/s per worker, "
                    f"{measured[name][0][1]:6.2f} MB per sample")
            if args.workers:
                got = loader_rate(ds, collate, 4, args.workers,
                                  args.loader_batches or max(4, args.images // 4))
                line += f" | loader with {args.workers} workers {got:8.1f} samples/s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
