"""The generator (shards, resume, bad images) and the ``siamese-detr proposals`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from siamese_detr.cli.main import UserError, main
from siamese_detr.proposals import generate
from siamese_detr.proposals.generate import generate_proposals, resolve_shard
from siamese_detr.proposals.store import ProposalStore, part_done

SIZES = [(128, 96), (112, 112), (96, 128), (120, 100), (100, 120), (128, 128), (96, 96)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 small photo crops in two class folders (same stems in both) + 2 broken files."""
    root = tmp_path_factory.mktemp("photos")
    sources = [data.astronaut(), data.coffee(), data.chelsea()]
    for i, (w, h) in enumerate(SIZES):
        image = Image.fromarray(sources[i % 3]).resize((w, h))
        folder = root / ("n01" if i % 2 else "n02")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"img_{i // 2}.jpg", quality=90)
    (root / "n01" / "corrupt.jpg").write_bytes(b"GIF89 this is not an image")
    whole = (root / "n02" / "img_0.jpg").read_bytes()
    (root / "n02" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def _store_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "log.jsonl"}


def _run(photos: Path, out: Path, **kw) -> generate.GenerateSummary:  # noqa: ANN003
    kw.setdefault("chunk_size", 2)
    kw.setdefault("max_boxes", 64)
    return generate_proposals(photos, out, progress=False, **kw)


def test_single_run_records_bad_images_and_finalises(photos: Path, tmp_path: Path) -> None:
    summary = _run(photos, tmp_path / "s")
    assert summary.finalized and summary.images_done == 7 and summary.images_skipped == 2
    store = ProposalStore.open(tmp_path / "s")
    assert len(store) == 7 and "n01/img_0.jpg" in store and "n02/img_0.jpg" in store
    failures = store.meta["failures"]
    assert set(failures) == {"n01/corrupt.jpg", "n02/truncated.jpg"}
    assert "UnidentifiedImageError" in failures["n01/corrupt.jpg"]
    assert "truncated" in failures["n02/truncated.jpg"]
    boxes, scores = store.get("n02/img_0.jpg")
    assert 1 <= len(boxes) <= 64 and np.all(boxes[:, 2] <= 128) and np.all(boxes[:, 3] <= 96)
    assert store.image_size("n02/img_0.jpg") == (96, 128)
    assert store.meta["source"]["path"] == str(photos.resolve())
    log = [json.loads(line) for line in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert [e["chunk"] for e in log if e["event"] == "chunk"] == [0, 1, 2, 3, 4]
    # "9 images" as a count (not the tail of a rate such as "57.79 images/s")
    assert re.search(r"(?<![\d.])9 images", " ".join(summary.lines())) is None
    assert "store: 7 images" in summary.lines()[-1]


def test_shard_union_equals_single_process(photos: Path, tmp_path: Path) -> None:
    _run(photos, tmp_path / "one")
    first = _run(photos, tmp_path / "sharded", shard="1/2")
    assert not first.finalized and first.chunks_mine == 2  # chunks 1, 3 of 0..4
    assert not (tmp_path / "sharded" / "meta.json").exists()
    assert main(["proposals", "merge", str(tmp_path / "sharded")]) == 2  # shard 0 missing
    second = _run(photos, tmp_path / "sharded", shard=(0, 2), finalize=False)
    assert second.chunks_mine == 3 and not second.finalized
    assert main(["proposals", "merge", str(tmp_path / "sharded")]) == 0
    assert _store_files(tmp_path / "sharded") == _store_files(tmp_path / "one")
    one, two = ProposalStore.open(tmp_path / "one"), ProposalStore.open(tmp_path / "sharded")
    for image_id in one.ids():
        assert np.array_equal(one.get(image_id)[0], two.get(image_id)[0])


def test_kill_then_resume_is_identical_and_skips_finished_chunks(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(photos, tmp_path / "clean")
    real = generate.process_record
    calls: list[str] = []

    def dying(record, settings):  # noqa: ANN001, ANN202
        if len(calls) == 5:  # mid-chunk 2 (chunk size 2)
            raise KeyboardInterrupt
        calls.append(record.image_id)
        return real(record, settings)

    monkeypatch.setattr(generate, "process_record", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(photos, tmp_path / "killed")
    out = tmp_path / "killed"
    assert [part_done(out, c) for c in range(5)] == [True, True, False, False, False]
    assert not (out / "meta.json").exists()
    with pytest.raises(UserError):
        ProposalStore.open(out)
    stale = out / "parts" / ".tmp-chunk_000002-99999"  # what a kill mid-write leaves
    stale.mkdir()
    (stale / "boxes.npy").write_bytes(b"half")
    calls.clear()
    monkeypatch.setattr(generate, "process_record", lambda r, s: (calls.append(r.image_id),
                                                                  real(r, s))[1])
    summary = _run(photos, out)
    assert len(calls) == 9 - 4 and summary.chunks_already_done == 2  # chunks 0, 1 not redone
    assert _store_files(out) == _store_files(tmp_path / "clean")
    assert not stale.exists()


def test_process_pool_matches_in_process(photos: Path, tmp_path: Path) -> None:
    # selective search ranks regions with C rand(): per-image seeding makes it reproducible
    _run(photos, tmp_path / "seq", method="selective-search", seed=3)
    summary = _run(photos, tmp_path / "pool", method="selective-search", seed=3, workers=2)
    assert summary.images_done == 7
    assert _store_files(tmp_path / "pool") == _store_files(tmp_path / "seq")


def test_other_settings_on_an_existing_store_are_refused(photos: Path, tmp_path: Path) -> None:
    _run(photos, tmp_path / "s", method="random")
    with pytest.raises(UserError, match="other settings.*method"):
        _run(photos, tmp_path / "s", method="edgeboxes")


def test_shard_from_arguments_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_shard() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "5")
    assert resolve_shard() == (2, 5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_shard() == (1, 4)  # torchrun wins over SLURM
    assert resolve_shard("3/8") == (3, 8)
    for bad in ("3", "4/4", "a/b"):
        with pytest.raises(UserError, match="shard"):
            resolve_shard(bad)


def test_cli_run_stats_show(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    assert main(["proposals", "run", str(photos), "--out", str(store), "--max-boxes", "32",
                 "--chunk-size", "4", "--no-progress"]) == 0
    assert "7 images done, 2 skipped" in capsys.readouterr().out
    assert main(["proposals", "stats", str(store), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 7 and stats["skipped"] == 2 and stats["boxes_per_image"]["max"] <= 32
    png = tmp_path / "viz" / "x.png"
    assert main(["proposals", "show", str(store), "n01/img_0.jpg", "--out", str(png),
                 "--top", "5"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == SIZES[1]
        drawn = np.asarray(im.convert("RGB")).astype(int)
    original = np.asarray(Image.open(photos / "n01" / "img_0.jpg").convert("RGB")).astype(int)
    assert np.abs(drawn - original).max() > 100  # boxes were drawn
    # the bare `proposals SOURCE --out STORE` form is an alias of `run` (and resumes: no work)
    assert main(["proposals", str(photos), "--out", str(store), "--max-boxes", "32",
                 "--chunk-size", "4", "--no-progress"]) == 0
    assert "0 chunks computed, 3 already done" in capsys.readouterr().out


def test_cli_errors_are_one_line_exit_2(photos: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["proposals", "run", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and err.startswith("siamese-detr")
    assert main(["proposals", "stats", str(tmp_path / "nostore")]) == 2
    _run(photos, tmp_path / "s", method="random")
    capsys.readouterr()
    assert main(["proposals", "show", str(tmp_path / "s"), "n01/corrupt.jpg",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "skipped" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
