"""Validation of a COCO-format data set when it is loaded (issue 10, items 5 and 6).

One rule for training and evaluation: :func:`sanitize_coco` removes the unusable annotations
and images from the ``COCO`` object itself, which both the training targets and the
evaluation ground truth are read from. Each kind of problem is logged once, as one line with
its count and the first few annotation ids or file names; a set with annotations of which none
is usable, or without images, is an error.

Unusable annotation: no ``bbox`` or not 4 finite numbers, ``category_id`` missing/null/not an
integer, ``image_id`` of no listed image, or a box with zero or negative width/height after
clipping to the image. Unusable image: its file is empty (0 bytes). Files that are present but
cannot be decoded are found while training and skipped (counted) there; a missing file is a
configuration error when it is read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
from typing import Any

from siamese_detr.errors import ConfigError, DataError

__all__ = ["sanitize_coco"]

log = logging.getLogger("siamese_detr")
SHOW = 3  # ids / names shown per kind of problem


def _annotation_problem(ann: dict[str, Any], images: dict[Any, dict[str, Any]]) -> str | None:
    box = ann.get("bbox")
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in box):
        return "annotations without a valid bbox [x, y, w, h]"
    cat = ann.get("category_id")
    if not isinstance(cat, int) or isinstance(cat, bool):
        return "annotations whose category_id is missing, null or not an integer"
    image = images.get(ann.get("image_id"))
    if image is None:
        return "annotations pointing to an image id that is not listed"
    x, y, w, h = (float(v) for v in box)
    width, height = float(image.get("width") or math.inf), float(image.get("height") or math.inf)
    if min(x + w, width) - max(x, 0.0) <= 0 or min(y + h, height) - max(y, 0.0) <= 0:
        return "boxes of zero or negative size (after clipping to the image)"
    return None


def sanitize_coco(coco: Any, ann_file: str | Path, image_folder: str | Path | None = None
                  ) -> dict[str, int]:
    """Drop unusable annotations and images from ``coco`` (in place, index rebuilt); log one
    warning line per kind of problem; return the counts per kind."""
    data = coco.dataset
    where = str(ann_file)
    if not data.get("images"):
        raise ConfigError(f"{where} lists no images (its 'images' key is missing or empty); "
                          "give a COCO instances json with 'images', 'annotations', "
                          "'categories'")
    problems: dict[str, list[Any]] = {}
    images = {im.get("id"): im for im in data["images"]}
    bad_images: set[Any] = set()
    if image_folder is not None:
        folder = Path(image_folder)
        for image_id, im in images.items():
            name = str(im.get("file_name", ""))
            try:
                empty = (folder / name).stat().st_size == 0
            except OSError:  # missing: a config error when read (names the folder keys)
                continue
            if empty:
                problems.setdefault("empty image files (0 bytes)", []).append(name)
                bad_images.add(image_id)
    annotations = data.get("annotations") or []
    kept = []
    for ann in annotations:
        reason = _annotation_problem(ann, images)
        if reason is not None:
            problems.setdefault(reason, []).append(ann.get("id", "?"))
        elif ann.get("image_id") not in bad_images:
            kept.append(ann)
    for reason, items in problems.items():
        shown = ", ".join(str(i) for i in items[:SHOW])
        log.warning("%s: %d %s dropped from training and evaluation (e.g. %s)", where,
                    len(items), reason, shown)
    if annotations and not any(not a.get("iscrowd", 0) for a in kept):
        summary = "; ".join(f"{len(v)} {k}" for k, v in problems.items())
        raise DataError(f"{where}: none of its {len(annotations)} annotations is usable "
                        f"({summary or 'all are crowd regions'}); fix the annotation file")
    if len(bad_images) == len(images):
        raise DataError(f"{where}: none of its {len(images)} images can be read from "
                        f"{image_folder}; check data.train_images / data.val_images")
    if problems:
        data["annotations"] = kept
        data["images"] = [im for im in data["images"] if im.get("id") not in bad_images]
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    return {k: len(v) for k, v in problems.items()}
