"""The on-disk proposal store: one directory per data set, random access by image id.

Layout::

    STORE/plan.json                 settings of the run (method, parameters, source, chunking)
    STORE/parts/chunk_000123/       one finished chunk (a shard of the store):
        part.json                     ids, per-image box counts and image sizes, failures
        boxes.npy                     [sum K, 4] absolute xyxy, rows of an image in score order
        scores.npy                    [sum K] float32
    STORE/index_ids.npy             sorted image ids (utf-8 bytes, ``S`` dtype)
    STORE/index_loc.npy             int64 [N, 5]: chunk, offset, count, height, width
    STORE/meta.json                 written last: the store is complete iff it exists
    STORE/log.jsonl                 one JSON line per finished chunk

**Box dtype.** Boxes are ``int16`` when every box of a part is integer-valued and within
``[-32768, 32767]`` (always the case for the built-in methods, whose boxes are integer pixel
coordinates, for images up to 32767 px) and ``float32`` otherwise, so reads are always
exact; readers get ``float32``. 512 boxes cost 4 KiB + 2 KiB of scores per image
(ImageNet-1k: ~7.5 GiB).

**Atomicity.** A part is written into ``parts/.tmp-chunk_XXXXXX-<pid>`` and renamed into
place (a directory rename is atomic), index and meta files through ``tmp + os.replace``; a
killed writer therefore never leaves a half part or a corrupt store, only a stale tmp folder.

**Reading.** :meth:`ProposalStore.open` memory-maps the index (binary search over the sorted
ids) and each part's arrays on first use, so many DataLoader workers share the page cache;
the object pickles without its maps (safe for ``spawn`` workers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from siamese_detr.errors import UserError
from siamese_detr.files import write_json, write_npy

__all__ = [
    "ImageProposals",
    "ProposalStore",
    "StoreWriter",
    "atomic_write_json",
    "finalize_store",
    "part_dir",
    "part_done",
    "write_part",
]

FORMAT = "siamese-detr-proposals"
VERSION = 1


@dataclass
class ImageProposals:
    """The proposals of one image as written into a part."""

    image_id: str
    boxes: np.ndarray  # [K, 4] absolute xyxy
    scores: np.ndarray  # [K]
    size: tuple[int, int] = (0, 0)  # (height, width) of the original image


def atomic_write_json(path: Path, data: Any) -> None:
    """The store's JSON files: ``files.write_json`` with one-space indent and sorted keys."""
    write_json(path, data, indent=1, sort_keys=True)


def part_dir(store_dir: str | Path, chunk: int) -> Path:
    return Path(store_dir) / "parts" / f"chunk_{chunk:06d}"


def part_done(store_dir: str | Path, chunk: int) -> bool:
    """Whether chunk ``chunk`` has a finished part (parts only ever appear complete)."""
    return (part_dir(store_dir, chunk) / "part.json").is_file()


def _box_dtype(boxes: np.ndarray) -> np.dtype:
    if boxes.size == 0:
        return np.dtype(np.int16)
    integral = bool(np.all(boxes == np.round(boxes)))
    in_range = boxes.min() >= -32768 and boxes.max() <= 32767
    return np.dtype(np.int16 if integral and in_range else np.float32)


def write_part(
    store_dir: str | Path,
    chunk: int,
    results: Sequence[ImageProposals],
    failures: dict[str, str] | None = None,
) -> Path:
    """Write one finished chunk atomically; a part that already exists is left untouched."""
    final = part_dir(store_dir, chunk)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        return final
    boxes, scores = [], []
    for r in results:
        b = np.asarray(r.boxes, np.float32).reshape(-1, 4)
        s = np.asarray(r.scores, np.float32).reshape(-1)
        if len(b) != len(s):
            raise ValueError(f"{r.image_id}: {len(b)} boxes but {len(s)} scores")
        order = np.argsort(-s, kind="stable")  # rows of an image in score order
        boxes.append(b[order])
        scores.append(s[order])
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    all_scores = np.concatenate(scores) if scores else np.zeros((0,), np.float32)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "boxes.npy", all_boxes.astype(_box_dtype(all_boxes)))
    np.save(tmp / "scores.npy", all_scores)
    info = {
        "chunk": chunk,
        "ids": [r.image_id for r in results],
        "counts": [len(b) for b in boxes],
        "sizes": [[int(r.size[0]), int(r.size[1])] for r in results],
        "failures": dict(sorted((failures or {}).items())),
    }
    with open(tmp / "part.json", "w", encoding="utf-8") as handle:
        json.dump(info, handle)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same chunk first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_part_info(store_dir: Path, chunk: int) -> dict[str, Any]:
    with open(part_dir(store_dir, chunk) / "part.json", encoding="utf-8") as handle:
        return json.load(handle)


def _count_stats(counts: np.ndarray) -> dict[str, float]:
    if len(counts) == 0:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    return {"min": int(counts.min()), "median": float(np.median(counts)),
            "mean": round(float(counts.mean()), 3), "max": int(counts.max())}


def finalize_store(store_dir: str | Path) -> dict[str, Any]:
    """Merge all finished parts into the index and write ``meta.json`` (idempotent).

    Needs ``plan.json`` and every one of its ``num_chunks`` parts; raises :class:`UserError`
    naming how many parts are missing otherwise. Returns the meta dict.
    """
    store_dir = Path(store_dir)
    plan_path = store_dir / "plan.json"
    if not plan_path.is_file():
        raise UserError(f"{store_dir} is not a proposal store (no plan.json)")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    num_chunks = int(plan["num_chunks"])
    missing = [c for c in range(num_chunks) if not part_done(store_dir, c)]
    if missing:
        raise UserError(f"{store_dir}: {len(missing)} of {num_chunks} chunks are not finished "
                        f"(e.g. chunk {missing[0]}); run the missing shards first")
    ids: list[bytes] = []
    rows: list[tuple[int, int, int, int, int]] = []
    failures: dict[str, str] = {}
    for chunk in range(num_chunks):
        info = _read_part_info(store_dir, chunk)
        offsets = np.concatenate([[0], np.cumsum(info["counts"], dtype=np.int64)])
        for i, image_id in enumerate(info["ids"]):
            ids.append(image_id.encode("utf-8"))
            h, w = info["sizes"][i]
            rows.append((chunk, int(offsets[i]), int(info["counts"][i]), h, w))
        failures.update(info["failures"])
    order = sorted(range(len(ids)), key=ids.__getitem__)
    id_array = np.array([ids[i] for i in order], dtype=f"S{max((len(x) for x in ids), default=1)}")
    loc = np.array([rows[i] for i in order], np.int64).reshape(-1, 5)
    if len(id_array) > 1 and np.any(id_array[1:] == id_array[:-1]):
        raise UserError(f"{store_dir}: an image id occurs in two parts; the store is mixed up")
    write_npy(store_dir / "index_ids.npy", id_array)
    write_npy(store_dir / "index_loc.npy", loc)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        **{k: plan[k] for k in sorted(plan) if k not in ("format", "version")},
        "num_images": int(len(id_array)),
        "num_skipped": len(failures),
        "num_boxes": int(loc[:, 2].sum()) if len(loc) else 0,
        "boxes_per_image": _count_stats(loc[:, 2]),
        "failures": dict(sorted(failures.items())),
    }
    atomic_write_json(store_dir / "meta.json", meta)
    return meta


class ProposalStore:
    """Read-only random access to a finished store (see the module notes)."""

    def __init__(self, store_dir: Path, meta: dict[str, Any]) -> None:
        self.root = store_dir
        self.meta = meta
        self._ids: np.ndarray | None = None
        self._loc: np.ndarray | None = None
        self._parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def open(cls, store_dir: str | Path) -> ProposalStore:
        store_dir = Path(store_dir)
        meta_path = store_dir / "meta.json"
        if not meta_path.is_file():
            hint = (" (unfinished: run `siamese-detr proposals merge` once all shards are done)"
                    if (store_dir / "plan.json").is_file() else "")
            raise UserError(f"no finished proposal store at {store_dir}{hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{meta_path} is damaged (not valid JSON: {exc}); rebuild the "
                            "store with `siamese-detr proposals run`") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{meta_path} is not a siamese-detr proposal store")
        return cls(store_dir, meta)

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["meta"])  # type: ignore[misc]

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ids is None or self._loc is None:
            self._ids = np.load(self.root / "index_ids.npy", mmap_mode="r")
            self._loc = np.load(self.root / "index_loc.npy", mmap_mode="r")
        return self._ids, self._loc

    def _row(self, image_id: str) -> int | None:
        ids, _ = self._index()
        key = image_id.encode("utf-8")
        if len(ids) == 0 or len(key) > ids.dtype.itemsize:
            return None
        row = int(np.searchsorted(ids, key))
        return row if row < len(ids) and ids[row] == key else None

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and self._row(image_id) is not None

    def __len__(self) -> int:
        return len(self._index()[0])

    def ids(self) -> Iterator[str]:
        """All image ids with proposals, sorted (utf-8 byte order)."""
        return (x.decode("utf-8") for x in self._index()[0])

    def _part(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        part = self._parts.get(chunk)
        if part is None:
            folder = part_dir(self.root, chunk)
            part = (np.load(folder / "boxes.npy", mmap_mode="r"),
                    np.load(folder / "scores.npy", mmap_mode="r"))
            self._parts[chunk] = part
        return part

    def image_size(self, image_id: str) -> tuple[int, int]:
        """``(height, width)`` of the original image."""
        row = self._row(image_id)
        if row is None:
            raise KeyError(image_id)
        loc = self._index()[1][row]
        return int(loc[3]), int(loc[4])

    def get(
        self,
        image_id: str,
        top_k: int | None = None,
        min_size: float = 0.0,
        min_score: float = -math.inf,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (float32 ``[K, 4]`` absolute xyxy) and scores (float32 ``[K]``) in score
        order; boxes with a side shorter than ``min_size`` or a score below ``min_score`` are
        dropped, then the first ``top_k`` kept. Raises ``KeyError`` for an unknown id."""
        row = self._row(image_id)
        if row is None:
            raise KeyError(image_id)
        chunk, offset, count = (int(v) for v in self._index()[1][row][:3])
        boxes_mm, scores_mm = self._part(chunk)
        boxes = np.array(boxes_mm[offset:offset + count], dtype=np.float32)
        scores = np.array(scores_mm[offset:offset + count], dtype=np.float32)
        keep = np.ones(count, dtype=bool)
        if min_size > 0:
            keep &= np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= min_size
        if min_score > -math.inf:
            keep &= scores >= min_score
        if not keep.all():
            boxes, scores = boxes[keep], scores[keep]
        if top_k is not None:
            boxes, scores = boxes[:top_k], scores[:top_k]
        return boxes, scores

    def stats(self, sample: int = 1000) -> dict[str, Any]:
        """Coverage: images, skipped, boxes per image, mean box size (over ``sample`` images
        taken at an even stride) in pixels and relative to the image."""
        ids, loc = self._index()
        picks = np.unique(np.linspace(0, len(ids) - 1, min(sample, len(ids))).astype(np.int64))
        widths, heights, rel = [], [], []
        for row in picks if len(ids) else []:
            boxes, _ = self.get(ids[row].decode("utf-8"))
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            widths.append(w)
            heights.append(h)
            img_h, img_w = int(loc[row][3]), int(loc[row][4])
            if img_h > 0 and img_w > 0:
                rel.append(np.sqrt(w * h / (img_w * img_h)))
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))  # noqa: E731
        mean = (lambda x: round(float(x.mean()), 2) if len(x) else 0.0)  # noqa: E731
        return {
            "images": len(ids),
            "skipped": int(self.meta.get("num_skipped", 0)),
            "boxes": int(np.asarray(loc[:, 2]).sum()) if len(ids) else 0,
            "boxes_per_image": _count_stats(np.asarray(loc[:, 2])),
            "mean_box_width": mean(cat(widths)),
            "mean_box_height": mean(cat(heights)),
            "mean_relative_size": round(float(cat(rel).mean()), 4) if rel else 0.0,
            "sampled_images": int(len(picks)) if len(ids) else 0,
        }


@dataclass
class StoreWriter:
    """Build a complete store from in-memory results (tests, conversions, benchmarks)."""

    root: Path
    chunk_size: int = 256
    plan: dict[str, Any] = field(default_factory=dict)
    _pending: list[ImageProposals] = field(default_factory=list)
    _failures: dict[str, str] = field(default_factory=dict)
    _chunks: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def add(self, image_id: str, boxes: np.ndarray, scores: np.ndarray,
            size: tuple[int, int] = (0, 0)) -> None:
        self._pending.append(ImageProposals(image_id, boxes, scores, size))
        if len(self._pending) >= self.chunk_size:
            self._flush()

    def fail(self, image_id: str, reason: str) -> None:
        self._failures[image_id] = reason

    def _flush(self) -> None:
        write_part(self.root, self._chunks, self._pending, self._failures)
        self._chunks += 1
        self._pending, self._failures = [], {}

    def close(self) -> ProposalStore:
        if self._pending or self._failures or self._chunks == 0:
            self._flush()
        atomic_write_json(self.root / "plan.json",
                          {**self.plan, "num_chunks": self._chunks, "chunk_size": self.chunk_size})
        finalize_store(self.root)
        return ProposalStore.open(self.root)
