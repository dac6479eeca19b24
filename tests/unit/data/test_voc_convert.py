"""VOC devkit -> COCO json: boxes, categories, difficult flags, ids, merging, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from siamese_detr.cli.main import UserError, main
from siamese_detr.data.voc import VOC_CLASSES, parse_voc_xml, voc_to_coco

# (year, stem, width, height, [(name, xmin, ymin, xmax, ymax, difficult)])
IMAGES = [
    ("2007", "000005", 500, 375, [("chair", 263, 211, 324, 339, 0),
                                  ("chair", 5, 244, 67, 374, 1)]),
    ("2007", "000007", 500, 333, [("car", 141, 50, 500, 330, 0)]),
    ("2012", "2008_000123", 320, 240, [("tvmonitor", 1, 1, 320, 240, 0),
                                       ("aeroplane", 10, 20, 30, 40, 1)]),
]


def _xml(stem: str, w: int, h: int, objs) -> str:
    body = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2, d in objs)
    return (f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename><size>"
            f"<width>{w}</width><height>{h}</height><depth>3</depth></size>{body}</annotation>")


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    for year in ("2007", "2012"):
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / f"VOC{year}" / sub).mkdir(parents=True)
    for year, stem, w, h, objs in IMAGES:
        (root / f"VOC{year}" / "Annotations" / f"{stem}.xml").write_text(_xml(stem, w, h, objs))
        Image.new("RGB", (w, h)).save(root / f"VOC{year}" / "JPEGImages" / f"{stem}.jpg")
    (root / "VOC2007/ImageSets/Main/trainval.txt").write_text("000005\n000007\n")
    (root / "VOC2012/ImageSets/Main/trainval.txt").write_text("2008_000123\n")
    return root


def test_convert_and_round_trip(devkit: Path) -> None:
    data = voc_to_coco(devkit, [("2007", "trainval"), ("2012", "trainval")])
    assert [c["id"] for c in data["categories"]] == list(range(20))
    assert [c["name"] for c in data["categories"]][:3] == ["aeroplane", "bicycle", "bird"]
    assert data["categories"][19]["name"] == "tvmonitor"
    by_id = {im["id"]: im for im in data["images"]}
    assert set(by_id) == {5, 7, 2008000123}
    assert by_id[5]["file_name"] == "VOC2007/JPEGImages/000005.jpg"
    assert by_id[2008000123]["file_name"] == "VOC2012/JPEGImages/2008_000123.jpg"
    assert (by_id[7]["width"], by_id[7]["height"]) == (500, 333)
    for im in data["images"]:
        assert (devkit / im["file_name"]).is_file()
    ids = [a["id"] for a in data["annotations"]]
    assert len(set(ids)) == len(ids) and min(ids) >= 1
    # every annotation maps back to the XML values (xmin = x + 1, xmax = x + w, ...)
    expected = {(int(s.replace("_", "")), n, x1, y1, x2, y2, d)
                for _, s, _, _, objs in IMAGES for n, x1, y1, x2, y2, d in objs}
    got = set()
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["area"] == pytest.approx(w * h) and a["iscrowd"] == 0
        assert a["ignore"] == a["difficult"]
        got.add((a["image_id"], VOC_CLASSES[a["category_id"]], x + 1, y + 1, x + w, y + h,
                 a["difficult"]))
    assert got == expected
    chair = next(a for a in data["annotations"] if a["image_id"] == 5 and not a["difficult"])
    assert chair["bbox"] == [262.0, 210.0, 62.0, 129.0]
    assert chair["category_id"] == VOC_CLASSES.index("chair") == 8


def test_cli_writes_json_and_merges(devkit: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "voc0712.json"
    rc = main(["voc2coco", "--devkit", str(devkit), "--sets", "2007:trainval",
               "2012:trainval", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["images"]) == 3 and len(data["annotations"]) == 5
    assert "3 images" in capsys.readouterr().out
    assert not list(out.parent.glob("*.tmp"))
    # pycocotools reads it
    from siamese_detr.eval.coco import coco_evaluate

    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 1.0} for a in data["annotations"]]
    assert coco_evaluate(out, res)["AP"] == pytest.approx(1.0)


def test_errors_name_the_path(devkit: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match="test.txt"):
        voc_to_coco(devkit, [("2007", "test")])
    with pytest.raises(UserError, match="VOC2010"):
        voc_to_coco(devkit, [("2010", "trainval")])
    (devkit / "VOC2007/ImageSets/Main/val.txt").write_text("000009\n")
    with pytest.raises(UserError, match="000009.xml"):
        voc_to_coco(devkit, [("2007", "val")])
    rc = main(["voc2coco", "--devkit", str(tmp_path / "nope"), "--sets", "2007:trainval",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc = main(["voc2coco", "--devkit", str(devkit), "--sets", "2007", "--out",
               str(tmp_path / "x.json")])
    assert rc == 2 and "YEAR:SPLIT" in capsys.readouterr().err
    bad = devkit / "VOC2007/Annotations/000005.xml"
    bad.write_text(_xml("000005", 10, 10, [("unicorn", 1, 1, 5, 5, 0)]))
    with pytest.raises(UserError, match="unicorn"):
        voc_to_coco(devkit, [("2007", "trainval")])


def test_missing_size_read_from_image_and_running_ids(tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "Annotations/abc.xml").write_text(
        "<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
        "<xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>")
    Image.new("RGB", (40, 30)).save(root / "JPEGImages/abc.jpg")
    (root / "Annotations/000010.xml").write_text(_xml("000010", 8, 8, []))
    (root / "ImageSets/Main/x.txt").write_text("abc\n000010\n")
    parsed = parse_voc_xml(root / "Annotations/abc.xml")
    assert parsed["objects"][0]["box"] == (1.0, 2.0, 3.0, 4.0)
    assert not parsed["objects"][0]["difficult"]
    data = voc_to_coco(tmp_path / "VOCdevkit", [("2007", "x")])
    ims = {im["file_name"].split("/")[-1]: im for im in data["images"]}
    assert ims["000010.jpg"]["id"] == 10 and ims["abc.jpg"]["id"] == 11
    assert (ims["abc.jpg"]["width"], ims["abc.jpg"]["height"]) == (40, 30)
    assert data["annotations"][0]["bbox"] == [0.0, 1.0, 3.0, 3.0]
