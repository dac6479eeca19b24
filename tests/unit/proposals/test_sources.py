"""Image sources: folders (relative-path ids), list files and COCO jsons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siamese_detr.cli.main import UserError
from siamese_detr.data.sources import ImageRecord, find_image, list_images


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_ids_are_relative_paths_and_same_stems_stay_distinct(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _touch(root / "n02" / "img_1.JPEG")
    _touch(root / "n01" / "img_1.JPEG")  # same stem, other class folder
    _touch(root / "n01" / "deep" / "z.png")
    _touch(root / "n01" / "notes.txt")  # not an image
    _touch(root / ".hidden" / "h.jpg")  # hidden folders are skipped
    records = list_images(root)
    assert [r.image_id for r in records] == ["n01/deep/z.png", "n01/img_1.JPEG", "n02/img_1.JPEG"]
    assert records[1] == ImageRecord("n01/img_1.JPEG", root / "n01" / "img_1.JPEG")
    assert list_images(root) == records  # stable


def test_list_file_first_token_relative_to_list_folder_or_root(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs" / "b.jpg")
    listing = tmp_path / "imgs" / "train.txt"
    listing.write_text("# comment\nb.jpg 3\n\nsub/a.jpg\tlabel\nb.jpg 3\n", encoding="utf-8")
    records = list_images(listing)
    assert [r.image_id for r in records] == ["b.jpg", "sub/a.jpg"]  # sorted, de-duplicated
    assert records[0].path == tmp_path / "imgs" / "b.jpg"
    other = tmp_path / "elsewhere"
    assert list_images(listing, root=other)[1].path == other / "sub" / "a.jpg"


def test_coco_json_ids_and_guessed_sibling_root(tmp_path: Path) -> None:
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir()
    images = [{"id": 42, "file_name": "000042.jpg"}, {"id": 7, "file_name": "000007.jpg"},
              {"id": 100, "file_name": "000100.jpg"}]
    ann.write_text(json.dumps({"images": images, "annotations": []}), encoding="utf-8")
    _touch(tmp_path / "val2017" / "000007.jpg")
    records = list_images(ann)
    assert [r.image_id for r in records] == ["7", "42", "100"]  # numeric COCO id order
    assert records[0].path == tmp_path / "val2017" / "000007.jpg"
    explicit = list_images(ann, root=tmp_path / "x")
    assert explicit[2].path == tmp_path / "x" / "000100.jpg"


def test_missing_or_empty_source_is_a_user_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found in .*empty"):
        list_images(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="bad.json"):
        list_images(bad)


def test_find_image(tmp_path: Path) -> None:
    path = _touch(tmp_path / "a" / "x.jpg")
    assert find_image(tmp_path, "a/x.jpg") == path
    with pytest.raises(UserError, match="not in"):
        find_image(tmp_path, "a/y.jpg")
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps({"images": [{"id": 3, "file_name": "a/x.jpg"}]}), encoding="utf-8")
    assert find_image(ann, "3", root=tmp_path) == path
