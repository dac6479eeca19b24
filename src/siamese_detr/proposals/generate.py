"""Offline proposal generation over an image source: parallel, sharded and resumable.

The sorted image list (:func:`siamese_detr.data.sources.list_images`) is cut into fixed
chunks of ``chunk_size`` images. Shard ``I/N`` owns the chunks ``c`` with ``c % N == I``; each
finished chunk becomes one part of the store, written atomically (see
:mod:`siamese_detr.proposals.store`). Re-running skips finished chunks, so a run killed at any
moment resumes where it stopped and never leaves a corrupt store. When every chunk of every
shard exists, any process (or ``siamese-detr proposals merge``) writes the index and
``meta.json``. Unreadable images are recorded with their reason and skipped.

The shard comes from ``shard=`` or, when not given, from ``RANK``/``WORLD_SIZE`` (torchrun)
or ``SLURM_PROCID``/``SLURM_NTASKS``. ``workers > 1`` runs a ``spawn`` process pool (one
OpenCV thread per worker); results are collected in order by the parent, which writes parts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from siamese_detr.data.images import load_rgb_array
from siamese_detr.data.sources import ImageRecord, list_images, source_kind
from siamese_detr.engine.env import world_from_env
from siamese_detr.errors import UserError
from siamese_detr.proposals import methods
from siamese_detr.proposals.store import (
    ImageProposals,
    atomic_write_json,
    finalize_store,
    part_dir,
    part_done,
    write_part,
)

__all__ = [
    "METHODS",
    "GenerateSummary",
    "ProposalSettings",
    "compute_proposals",
    "generate_proposals",
    "process_record",
    "resolve_shard",
]

METHODS: tuple[str, ...] = ("edgeboxes", "selective-search", "random")


@dataclass(frozen=True, kw_only=True)
class ProposalSettings:
    """What to compute per image; recorded in the store's plan and meta."""

    method: str = "edgeboxes"
    max_boxes: int = 512
    edge_model: str | None = None  # model.yml.gz for Structured Edge Detection
    working_size: int = 512  # longest side the image is shrunk to (0: original size)
    ss_mode: str = "fast"  # selective search: fast | quality
    seed: int = 0  # random boxes; selective search's region ranking

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown proposal method {self.method!r}; choose from "
                            f"{', '.join(METHODS)}")
        if self.max_boxes < 1:
            raise UserError(f"--max-boxes must be >= 1 (got {self.max_boxes})")
        if self.working_size < 0:
            raise UserError(f"--working-size must be >= 0 (got {self.working_size})")
        if self.edge_model is not None and not Path(self.edge_model).is_file():
            raise UserError(f"edge model not found: {self.edge_model}")


@dataclass
class GenerateSummary:
    """What one ``generate_proposals`` call did (and the store totals when finalised)."""

    shard: tuple[int, int]
    chunks_total: int
    chunks_mine: int
    chunks_computed: int
    chunks_already_done: int
    images_done: int = 0
    images_skipped: int = 0
    boxes_per_image: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    finalized: bool = False
    meta: dict[str, Any] | None = None

    def lines(self) -> list[str]:
        rate = self.images_done / self.seconds if self.seconds > 0 else 0.0
        i, n = self.shard
        out = [f"shard {i}/{n}: {self.chunks_computed} chunks computed, "
               f"{self.chunks_already_done} already done ({self.chunks_mine} of "
               f"{self.chunks_total} chunks are this shard's)",
               f"this run: {self.images_done} images done, {self.images_skipped} skipped, "
               f"{rate:.2f} images/s, boxes per image {_fmt_stats(self.boxes_per_image)}"]
        if self.meta is not None:
            out.append(f"store: {self.meta['num_images']} images, {self.meta['num_skipped']} "
                       f"skipped, boxes per image {_fmt_stats(self.meta['boxes_per_image'])}")
        else:
            out.append("store not finalised yet: other shards' chunks are missing; run "
                       "`siamese-detr proposals merge STORE` once they are done")
        return out


def _fmt_stats(stats: dict[str, float]) -> str:
    if not stats:
        return "-"
    return f"min {stats['min']} / median {stats['median']:g} / max {stats['max']}"


def resolve_shard(shard: tuple[int, int] | str | None = None) -> tuple[int, int]:
    """``(I, N)`` from ``shard`` (``"I/N"`` or a tuple), else torchrun, else SLURM, else 0/1."""
    if shard is None:
        rank, world, _ = world_from_env()
        shard = (rank, world)
    if isinstance(shard, str):
        try:
            index, count = (int(x) for x in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard must look like I/N, e.g. 0/4 (got {shard!r})") from None
    else:
        index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard {index}/{count} is invalid: need 0 <= I < N")
    return index, count


def compute_proposals(image: np.ndarray, image_id: str, settings: ProposalSettings
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The proposals of one RGB uint8 image under ``settings``."""
    if settings.method == "edgeboxes":
        return methods.edgeboxes(image, max_boxes=settings.max_boxes,
                                 model_path=settings.edge_model,
                                 working_size=settings.working_size)
    if settings.method == "selective-search":
        return methods.selective_search(image, mode=settings.ss_mode,  # type: ignore[arg-type]
                                        max_boxes=settings.max_boxes,
                                        working_size=settings.working_size,
                                        seed=methods.seed_for(image_id, settings.seed))
    return methods.random_boxes(image.shape, settings.max_boxes,
                                methods.seed_for(image_id, settings.seed))


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image fully (truncated files raise) as RGB uint8 through the package's one
    decoder (:func:`siamese_detr.data.images.load_rgb`: 16-bit, palette, alpha, EXIF)."""
    return load_rgb_array(path)


def process_record(record: ImageRecord, settings: ProposalSettings
                   ) -> tuple[ImageProposals | None, str | None]:
    """Proposals of one image, or ``(None, reason)`` when it cannot be read or processed."""
    try:
        image = load_rgb(record.path)
    except Exception as exc:  # unreadable, corrupt, truncated: recorded, never fatal
        return None, f"unreadable image: {type(exc).__name__}: {exc}"
    try:
        boxes, scores = compute_proposals(image, record.image_id, settings)
    except Exception as exc:
        return None, f"{settings.method} failed: {type(exc).__name__}: {exc}"
    return ImageProposals(record.image_id, boxes, scores, image.shape[:2]), None


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _process_task(task: tuple[int, ImageRecord], settings: ProposalSettings
                  ) -> tuple[int, ImageRecord, ImageProposals | None, str | None]:
    chunk, record = task
    result, reason = process_record(record, settings)
    return chunk, record, result, reason


def _results(tasks: list[tuple[int, ImageRecord]], settings: ProposalSettings, workers: int
             ) -> Iterator[tuple[int, ImageRecord, ImageProposals | None, str | None]]:
    if workers <= 1:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for task in tasks:
                yield _process_task(task, settings)
        finally:
            cv2.setNumThreads(threads)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(functools.partial(_process_task, settings=settings), tasks,
                             chunksize=2)


def _plan(records: list[ImageRecord], source: Path, images_root: str | Path | None,
          settings: ProposalSettings, chunk_size: int) -> dict[str, Any]:
    digest = hashlib.sha1("\n".join(r.image_id for r in records).encode("utf-8")).hexdigest()
    params: dict[str, Any] = asdict(settings)
    if settings.method == "edgeboxes":
        eb = methods.EdgeBoxesParams(max_boxes=settings.max_boxes).as_dict()
        params["edgeboxes"] = eb
        params["edge_map"] = "structured" if settings.edge_model else "canny-thinned-sobel"
    return {
        "method": settings.method,
        "params": params,
        "source": {"path": str(source.resolve()), "kind": source_kind(source),
                   "images_root": str(Path(images_root).resolve()) if images_root else None},
        "num_source_images": len(records),
        "ids_sha1": digest,
        "chunk_size": chunk_size,
        "num_chunks": -(-len(records) // chunk_size),
    }


def _check_or_write_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    path = out_dir / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in plan if k != "source" and old.get(k) != plan[k]]
        if diff:
            raise UserError(f"{out_dir} was started with other settings ({', '.join(diff)} "
                            "differ); use a new --out folder or the same settings")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan)


def _log(out_dir: Path, event: dict[str, Any]) -> None:
    line = json.dumps({"time": round(time.time(), 3), **event}) + "\n"
    with open(out_dir / "log.jsonl", "a", encoding="utf-8") as handle:
        handle.write(line)


def _clean_stale(out_dir: Path, chunks: Iterable[int]) -> None:
    for chunk in chunks:
        name = part_dir(out_dir, chunk).name
        for stale in (out_dir / "parts").glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def generate_proposals(
    source: str | Path,
    out_dir: str | Path,
    method: str = "edgeboxes",
    workers: int = 1,
    shard: tuple[int, int] | str | None = None,
    chunk_size: int = 256,
    max_boxes: int = 512,
    edge_model: str | None = None,
    working_size: int = 512,
    images_root: str | Path | None = None,
    ss_mode: str = "fast",
    seed: int = 0,
    progress: bool = True,
    finalize: bool = True,
) -> GenerateSummary:
    """Compute this shard's missing chunks of ``source`` into the store ``out_dir``.

    Finalises the store (index + meta.json) when all chunks of all shards exist and
    ``finalize`` is set. See the module notes for chunking, sharding and resuming.
    """
    if chunk_size < 1 or workers < 1:
        raise UserError("--chunk-size and --workers must be >= 1")
    settings = ProposalSettings(method=method, max_boxes=max_boxes, edge_model=edge_model,
                                working_size=working_size, ss_mode=ss_mode, seed=seed)
    index, count = resolve_shard(shard)
    out = Path(out_dir)
    records = list_images(source, images_root)
    plan = _plan(records, Path(source), images_root, settings, chunk_size)
    _check_or_write_plan(out, plan)
    mine = list(range(index, plan["num_chunks"], count))
    _clean_stale(out, mine)
    todo = [c for c in mine if not part_done(out, c)]
    summary = GenerateSummary((index, count), plan["num_chunks"], len(mine), len(todo),
                              len(mine) - len(todo))
    tasks = [(c, r) for c in todo for r in records[c * chunk_size:(c + 1) * chunk_size]]
    start = time.perf_counter()
    counts = _run_chunks(out, tasks, settings, workers, (index, count), progress, summary)
    summary.seconds = time.perf_counter() - start
    summary.boxes_per_image = _stats(counts)
    if finalize and all(part_done(out, c) for c in range(plan["num_chunks"])):
        summary.meta = finalize_store(out)
        summary.finalized = True
        _log(out, {"event": "finalized", "images": summary.meta["num_images"]})
    return summary


def _stats(counts: list[int]) -> dict[str, float]:
    if not counts:
        return {}
    return {"min": int(min(counts)), "median": float(np.median(counts)), "max": int(max(counts))}


def _run_chunks(out: Path, tasks: list[tuple[int, ImageRecord]], settings: ProposalSettings,
                workers: int, shard: tuple[int, int], progress: bool,
                summary: GenerateSummary) -> list[int]:
    """Run ``tasks`` in order, writing each chunk's part as soon as its last image is done."""
    sizes: dict[int, int] = {}
    for chunk, _ in tasks:
        sizes[chunk] = sizes.get(chunk, 0) + 1
    done: dict[int, list[ImageProposals]] = {}
    failed: dict[int, dict[str, str]] = {}
    counts: list[int] = []
    started = time.perf_counter()
    bar = tqdm(total=len(tasks), unit="img", disable=not progress, dynamic_ncols=True,
               desc=f"proposals {settings.method} {shard[0]}/{shard[1]}")
    with bar:
        for chunk, record, result, reason in _results(tasks, settings, workers):
            if result is None:
                failed.setdefault(chunk, {})[record.image_id] = reason or "unknown error"
                summary.images_skipped += 1
            else:
                done.setdefault(chunk, []).append(result)
                counts.append(len(result.boxes))
                summary.images_done += 1
            bar.update(1)
            sizes[chunk] -= 1
            if sizes[chunk] == 0:
                results, failures = done.pop(chunk, []), failed.pop(chunk, {})
                write_part(out, chunk, results, failures)
                elapsed = time.perf_counter() - started
                _log(out, {"event": "chunk", "chunk": chunk, "shard": list(shard),
                           "images": len(results), "failed": len(failures),
                           "seconds": round(elapsed, 3)})
                started = time.perf_counter()
    return counts
