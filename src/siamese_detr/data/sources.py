"""Image lists shared by offline proposals and pretraining.

A *source* is one of

* an image folder, searched recursively (ImageNet layout ``train/n01440764/x.JPEG`` works):
  ``image_id`` is the path relative to the folder, in posix form, extension included;
* a list file (any other file that is not ``.json``): one image per line, the first
  whitespace-separated token is the path, relative to ``root`` when given, else to the list
  file's folder; ``image_id`` is that token (normalised to posix form). Blank lines and lines
  starting with ``#`` are ignored;
* a COCO json: ``image_id = str(image["id"])`` and ``path = root / file_name``; without
  ``root`` the images folder is guessed: the json's own folder, or for the usual
  ``annotations/instances_<split>.json`` layout the sibling folder ``<split>``.

The result is sorted (by ``image_id``; COCO by numeric id) and free of duplicates, so two
calls on the same source give the same order: chunking and sharding rely on that. Ids are
never bare file stems, so ``a/x.jpg`` and ``b/x.jpg`` stay distinct.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from siamese_detr.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "ImageRecord", "find_image", "list_images", "source_kind"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"}
)


@dataclass(frozen=True, order=True)
class ImageRecord:
    """One image: a stable string id and the file that holds it."""

    image_id: str
    path: Path


def source_kind(source: str | Path) -> str:
    """``"folder"``, ``"coco"`` or ``"list"``; raises :class:`UserError` when missing."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"image source not found: {path}")
    if path.is_dir():
        return "folder"
    return "coco" if path.suffix.lower() == ".json" else "list"


def list_images(source: str | Path, root: str | Path | None = None) -> list[ImageRecord]:
    """All images of ``source`` (folder, list file or COCO json), sorted and de-duplicated.

    ``root`` is the images folder for list files and COCO jsons (ignored for folders).
    Raises :class:`UserError` naming the path when the source is missing or holds no image.
    """
    path = Path(source)
    kind = source_kind(path)
    if kind == "folder":
        records = _from_folder(path)
    elif kind == "coco":
        records = _from_coco(path, Path(root) if root else None)
    else:
        records = _from_list(path, Path(root) if root else None)
    if not records:
        raise UserError(f"no images found in {path}")
    return records


def find_image(source: str | Path, image_id: str, root: str | Path | None = None) -> Path:
    """The file of ``image_id`` in ``source``, without listing a folder when avoidable."""
    kind = source_kind(source)
    if kind == "folder":
        candidate = Path(source) / image_id
        if candidate.is_file():
            return candidate
    elif kind == "list":
        base = Path(root) if root else Path(source).parent
        candidate = base / image_id
        if candidate.is_file():
            return candidate
    for record in list_images(source, root):
        if record.image_id == image_id:
            return record.path
    raise UserError(f"image id {image_id!r} is not in {source}")


def _from_folder(folder: Path) -> list[ImageRecord]:
    records = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            full = Path(dirpath) / name
            records.append(ImageRecord(full.relative_to(folder).as_posix(), full))
    records.sort()
    return records


def _normalise_token(token: str) -> str:
    """Posix form of a list-file path token (``./a\\b.jpg`` -> ``a/b.jpg``)."""
    return str(PurePosixPath(token.replace("\\", "/")))


def _from_list(list_file: Path, root: Path | None) -> list[ImageRecord]:
    base = root if root is not None else list_file.parent
    seen: dict[str, ImageRecord] = {}
    with open(list_file, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            image_id = _normalise_token(line.split()[0])
            if image_id not in seen:
                seen[image_id] = ImageRecord(image_id, base / image_id)
    return sorted(seen.values())


def _guess_coco_root(ann_file: Path, file_names: list[str]) -> Path:
    candidates = [ann_file.parent]
    split = ann_file.stem.rsplit("_", 1)[-1]
    candidates += [ann_file.parent.parent / split, ann_file.parent / split]
    for candidate in candidates:
        if file_names and (candidate / file_names[0]).is_file():
            return candidate
    return candidates[0]


def _from_coco(ann_file: Path, root: Path | None) -> list[ImageRecord]:
    try:
        with open(ann_file, encoding="utf-8") as handle:
            images = json.load(handle)["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{ann_file} is not a COCO json with an 'images' list ({exc})") from exc
    images = sorted({int(im["id"]): im for im in images}.items())
    names = [im["file_name"] for _, im in images]
    base = root if root is not None else _guess_coco_root(ann_file, names)
    return [ImageRecord(str(i), base / name) for (i, _), name in zip(images, names)]
