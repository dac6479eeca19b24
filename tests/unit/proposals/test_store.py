"""The proposal store: exact round trip, filters, dtypes, atomic parts, finalisation."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from siamese_detr.cli.main import UserError
from siamese_detr.proposals.store import (
    ImageProposals,
    ProposalStore,
    StoreWriter,
    atomic_write_json,
    finalize_store,
    part_dir,
    part_done,
    write_part,
)

BOXES = {
    "b/img.jpg": (np.array([[0, 0, 10, 10], [5, 5, 50, 40], [1, 2, 3, 4]], np.float32),
                  np.array([0.2, 0.9, 0.5], np.float32)),
    "a/img.jpg": (np.array([[10.5, 0.25, 20.75, 30]], np.float32), np.array([1.0], np.float32)),
    "c/ünï.png": (np.array([[0, 0, 40000, 5]], np.float32), np.array([0.3], np.float32)),
    "d.jpg": (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)),
    "e.jpg": (np.array([[2, 2, 8, 9], [0, 0, 60, 60]], np.float32),
              np.array([0.4, 0.4], np.float32)),
}


def _store(root: Path, chunk_size: int = 2) -> ProposalStore:
    writer = StoreWriter(root, chunk_size=chunk_size, plan={"method": "test"})
    for image_id, (boxes, scores) in BOXES.items():
        writer.add(image_id, boxes, scores, size=(64, 80))
    writer.fail("broken.jpg", "unreadable image: OSError")
    return writer.close()


def test_round_trip_is_exact_and_in_score_order(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    assert len(store) == 5 and "a/img.jpg" in store and "zzz" not in store and 3 not in store
    assert list(store.ids()) == sorted(BOXES, key=lambda s: s.encode())
    boxes, scores = store.get("b/img.jpg")
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.tolist() == [[5, 5, 50, 40], [1, 2, 3, 4], [0, 0, 10, 10]]
    assert np.array_equal(scores, np.array([0.9, 0.5, 0.2], np.float32))  # exact
    for image_id in ("a/img.jpg", "c/ünï.png"):  # float32 and > int16 range stay exact
        assert np.array_equal(store.get(image_id)[0], BOXES[image_id][0])
    assert store.get("d.jpg")[0].shape == (0, 4)
    assert store.get("e.jpg")[0].tolist() == [[2, 2, 8, 9], [0, 0, 60, 60]]  # stable ties
    assert store.image_size("e.jpg") == (64, 80)
    assert store.meta["failures"] == {"broken.jpg": "unreadable image: OSError"}
    assert store.meta["num_images"] == 5 and store.meta["num_skipped"] == 1
    with pytest.raises(KeyError):
        store.get("missing.jpg")


def test_filters(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    assert store.get("b/img.jpg", top_k=2)[0].tolist() == [[5, 5, 50, 40], [1, 2, 3, 4]]
    boxes, scores = store.get("b/img.jpg", min_size=5)
    assert boxes.tolist() == [[5, 5, 50, 40], [0, 0, 10, 10]]
    assert store.get("b/img.jpg", min_score=0.5)[1].tolist() == pytest.approx([0.9, 0.5])
    boxes, _ = store.get("b/img.jpg", top_k=1, min_size=0, min_score=-math.inf)
    assert boxes.tolist() == [[5, 5, 50, 40]]
    assert store.get("b/img.jpg", min_size=5, min_score=0.95)[0].shape == (0, 4)


def test_box_dtype_is_int16_when_exact_else_float32(tmp_path: Path) -> None:
    _store(tmp_path / "s", chunk_size=1)
    order = list(BOXES)  # chunk i holds the i-th added image
    dtypes = {order[i]: np.load(part_dir(tmp_path / "s", i) / "boxes.npy").dtype
              for i in range(len(order))}
    assert dtypes["b/img.jpg"] == np.int16 and dtypes["e.jpg"] == np.int16
    assert dtypes["a/img.jpg"] == np.float32  # fractional
    assert dtypes["c/ünï.png"] == np.float32  # 40000 > 32767


def test_pickled_store_reopens_lazily(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    store.get("a/img.jpg")  # opens memory maps
    clone = pickle.loads(pickle.dumps(store))
    assert clone._parts == {} and np.array_equal(clone.get("e.jpg")[0], store.get("e.jpg")[0])


def test_parts_are_never_overwritten_and_finalise_needs_all(tmp_path: Path) -> None:
    root = tmp_path / "s"
    one = [ImageProposals("x", np.array([[0, 0, 2, 2]]), np.array([1.0]), (4, 4))]
    write_part(root, 0, one)
    write_part(root, 0, [ImageProposals("y", np.array([[0, 0, 3, 3]]), np.array([1.0]))])
    assert part_done(root, 0) and not part_done(root, 1)
    assert not list((root / "parts").glob(".tmp-*"))
    atomic_write_json(root / "plan.json", {"method": "test", "num_chunks": 2})
    with pytest.raises(UserError, match="1 of 2 chunks"):
        finalize_store(root)
    with pytest.raises(UserError, match="merge"):
        ProposalStore.open(root)
    write_part(root, 1, [], {"z": "bad"})
    meta = finalize_store(root)
    assert meta["num_images"] == 1 and meta["failures"] == {"z": "bad"}
    assert ProposalStore.open(root).get("x")[0].tolist() == [[0, 0, 2, 2]]  # first write kept


def test_open_rejects_non_stores(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no finished proposal store"):
        ProposalStore.open(tmp_path)
    atomic_write_json(tmp_path / "meta.json", {"format": "other"})
    with pytest.raises(UserError, match="not a siamese-detr proposal store"):
        ProposalStore.open(tmp_path)


def test_stats(tmp_path: Path) -> None:
    stats = _store(tmp_path / "s").stats()
    assert stats["images"] == 5 and stats["skipped"] == 1 and stats["boxes"] == 7
    assert stats["boxes_per_image"] == {"min": 0, "median": 1.0, "mean": 1.4, "max": 3}
    assert stats["sampled_images"] == 5
    widths = [10, 45, 2, 10.25, 40000, 6, 60]
    assert stats["mean_box_width"] == pytest.approx(np.mean(widths), abs=0.01)
