"""PASCAL VOC devkit -> COCO-format json (the format every loader and evaluator here reads).

Layout read: ``<devkit>/VOC<year>/{Annotations/<stem>.xml, JPEGImages/<stem>.jpg,
ImageSets/Main/<split>.txt}``. Several ``(year, split)`` pairs are merged into one json
(e.g. VOC07+12 trainval).

Conventions of the written json:

* ``categories``: the 20 VOC classes with ids 0..19 in the standard order
  (:data:`VOC_CLASSES`), as in Siamese DETR's shipped VOC meta files; use
  ``model.num_classes=20``.
* ``images[].id``: ``int(stem)`` for numeric stems (``000005`` -> 5); VOC2012 stems such as
  ``2008_000123`` become ``int("2008000123")``; other stems get running ids after the largest
  numeric id. ``file_name`` is relative to the **devkit folder** (the image root to give to
  the data config), e.g. ``VOC2007/JPEGImages/000005.jpg``.
* ``annotations[].bbox``: VOC XML coordinates are 1-based inclusive pixel indices; they are
  mapped to 0-based continuous coordinates ``(xmin - 1, ymin - 1, xmax, ymax)``, i.e.
  ``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` and ``area = w * h``.
  (Siamese DETR's shipped json uses ``[xmin, ymin, xmax - xmin, ymax - ymin]`` instead: a
  one-pixel difference.) Inverse: ``xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h``.
* ``difficult`` and ``ignore`` (both 0/1) carry VOC's difficult flag; ``iscrowd`` is 0.
  pycocotools scores difficult objects as normal ground truth; :mod:`siamese_detr.eval.voc`
  ignores them as the VOC devkit does.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VOC_CLASSES", "parse_voc_xml", "voc_to_coco", "convert_voc", "parse_set"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
_CLASS_ID = {name: i for i, name in enumerate(VOC_CLASSES)}


def _user_error(message: str) -> Exception:
    from siamese_detr.errors import UserError

    return UserError(message)


def parse_set(text: str) -> tuple[str, str]:
    """``"2007:trainval"`` -> ``("2007", "trainval")``."""
    year, sep, split = text.partition(":")
    if not sep or not year or not split:
        raise _user_error(f"--sets entry {text!r} must look like YEAR:SPLIT, e.g. 2007:trainval")
    return year, split


def parse_voc_xml(path: Path) -> dict[str, Any]:
    """Read one VOC annotation file.

    Returns:
        ``{"width", "height", "objects": [{"name", "box": (xmin, ymin, xmax, ymax) floats in
        VOC's 1-based pixel indices, "difficult": bool}]}``; width/height 0 when absent.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise _user_error(f"cannot read VOC annotation {path}: {exc}") from exc
    size = root.find("size")

    def num(node: ET.Element | None, key: str, default: float = 0.0) -> float:
        text = node.findtext(key) if node is not None else None
        return float(text) if text not in (None, "") else default

    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in _CLASS_ID:
            raise _user_error(f"{path}: unknown VOC class {name!r} (expected one of the 20 "
                              "standard classes)")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise _user_error(f"{path}: object {name!r} has no <bndbox>")
        box = tuple(num(bnd, k) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append({"name": name, "box": box,
                        "difficult": bool(int(num(obj, "difficult", 0.0)))})
    return {"width": int(num(size, "width")), "height": int(num(size, "height")),
            "objects": objects}


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def voc_to_coco(devkit: str | Path, sets: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Build the COCO-format dict of the given ``(year, split)`` sets (see module doc).

    Raises:
        UserError: a missing folder/file (named), an unknown class, or two different images
            with the same id.
    """
    devkit = Path(devkit)
    if not devkit.is_dir():
        raise _user_error(f"VOC devkit folder not found: {devkit}")
    if not sets:
        raise _user_error("no VOC sets given (e.g. --sets 2007:trainval 2012:trainval)")
    entries: list[tuple[str, str]] = []  # (year folder, stem), duplicates dropped
    seen: set[tuple[str, str]] = set()
    for year, split in sets:
        folder = devkit / f"VOC{year}"
        list_file = folder / "ImageSets" / "Main" / f"{split}.txt"
        if not folder.is_dir():
            raise _user_error(f"VOC folder not found: {folder}")
        if not list_file.is_file():
            raise _user_error(f"VOC image list not found: {list_file}")
        for line in list_file.read_text().split("\n"):
            if line.strip() and (f"VOC{year}", line.split()[0]) not in seen:
                seen.add((f"VOC{year}", line.split()[0]))
                entries.append((f"VOC{year}", line.split()[0]))

    def numeric_id(stem: str) -> int | None:
        digits = stem.replace("_", "")
        return int(digits) if digits.isdigit() else None

    next_id = max((numeric_id(s) or 0 for _, s in entries), default=0) + 1
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    owner: dict[int, str] = {}
    for year_folder, stem in entries:
        xml = devkit / year_folder / "Annotations" / f"{stem}.xml"
        jpg = devkit / year_folder / "JPEGImages" / f"{stem}.jpg"
        if not xml.is_file():
            raise _user_error(f"VOC annotation not found: {xml}")
        image_id = numeric_id(stem)
        if image_id is None:
            image_id, next_id = next_id, next_id + 1
        file_name = f"{year_folder}/JPEGImages/{stem}.jpg"
        if image_id in owner:
            raise _user_error(f"image id {image_id} of {file_name} is also used by "
                              f"{owner[image_id]}; convert these sets separately")
        owner[image_id] = file_name
        info = parse_voc_xml(xml)
        width, height = info["width"], info["height"]
        if width <= 0 or height <= 0:
            if not jpg.is_file():
                raise _user_error(f"{xml} has no <size> and the image is missing: {jpg}")
            width, height = _image_size(jpg)
        images.append({"id": image_id, "file_name": file_name, "width": width,
                       "height": height})
        for obj in info["objects"]:
            xmin, ymin, xmax, ymax = obj["box"]
            w, h = xmax - xmin + 1, ymax - ymin + 1
            flag = int(obj["difficult"])
            annotations.append({
                "id": len(annotations) + 1,  # pycocotools needs ids > 0
                "image_id": image_id, "category_id": _CLASS_ID[obj["name"]],
                "bbox": [xmin - 1, ymin - 1, w, h], "area": w * h, "iscrowd": 0,
                "difficult": flag, "ignore": flag, "segmentation": [],
            })
    categories = [{"id": i, "name": n, "supercategory": "none"}
                  for i, n in enumerate(VOC_CLASSES)]
    return {
        "info": {"description": "PASCAL VOC " + " + ".join(f"{y} {s}" for y, s in sets),
                 "image_root": "the VOCdevkit folder (file_name is relative to it)",
                 "bbox_convention": "0-based continuous: [xmin-1, ymin-1, xmax-xmin+1, "
                                    "ymax-ymin+1] of the VOC XML values"},
        "images": images, "annotations": annotations, "categories": categories,
    }


def convert_voc(devkit: str | Path, sets: Sequence[tuple[str, str]], out: str | Path
                ) -> dict[str, Any]:
    """Convert and write the json atomically to ``out``; returns the dict."""
    from siamese_detr.files import write_json

    data = voc_to_coco(devkit, sets)
    write_json(out, data)
    return data
