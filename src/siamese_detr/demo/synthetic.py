"""Toy detection / pretraining data generated on the spot from scikit-image's bundled photos.

Nothing is downloaded: only the photos that ship inside scikit-image are used. The generator
(:func:`compose_image`) draws each image as follows (all randomness from a NumPy generator
seeded by ``(seed, split, image index)``, so one image never depends on how many others are
made, and the same seed gives the same bytes):

* **Background**: a random crop (40-100% of the source's short side, matching the output
  aspect) of one of the *background photos* (``rocket``, ``hubble_deep_field``,
  ``immunohistochemistry``, ``camera``, ``brick``, ``grass``, ``gravel``, ``coins``,
  ``moon``; grey ones converted to RGB), resized to ``image_size``, randomly mirrored,
  Gaussian-blurred (radius 1.5-3.5 px) and darkened to 35-60% brightness so objects stand out.
* **Objects**: 1..``max_objects`` (uniform) objects, each a crop of a recognisable photo:

  ====  ======  ==============================================  ============
  id    name    source (skimage.data, rows y0:y1, cols x0:x1)   border
  ====  ======  ==============================================  ============
  0     face    ``astronaut()[10:200, 140:310]`` (head)         red
  1     cat     ``chelsea()[0:290, 30:400]`` (cat's face)       green
  2     cup     ``coffee()[15:390, 75:485]`` (cup on saucer)    blue
  ====  ======  ==============================================  ============

  The object height is 25-60% of the image height (uniform); its width follows the crop's own
  aspect ratio times a factor in [0.8, 1.25], clipped to 25-60% of the image width. It is
  mirrored with probability 0.5, its brightness scaled by 0.85-1.15, and a solid border of the
  category's colour (``max(2, 4% of the short side)`` px wide) is drawn inside its edge. Objects
  are placed at integer positions fully inside the image and never overlap (an object that
  finds no free place in 30 tries is dropped; the first one always fits).
* **Ground truth**: the pasted rectangle, i.e. COCO ``bbox = [x, y, w, h]`` in whole pixels,
  ``area = w * h``, ``iscrowd = 0``.

Labels are the category ids 0, 1, 2, so fine-tune with ``model.num_classes=3``
(:data:`NUM_CLASSES`). Images are written as JPEG (quality 90).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CATEGORIES",
    "NUM_CLASSES",
    "DetectionSetPaths",
    "compose_image",
    "make_detection_set",
    "make_unlabeled_set",
    "photo_names",
    "shipped_photo",
]

# (id, name, skimage loader, (y0, y1, x0, x1), border RGB)
_OBJECTS: tuple[tuple[int, str, str, tuple[int, int, int, int], tuple[int, int, int]], ...] = (
    (0, "face", "astronaut", (10, 200, 140, 310), (230, 40, 40)),
    (1, "cat", "chelsea", (0, 290, 30, 400), (40, 210, 60)),
    (2, "cup", "coffee", (15, 390, 75, 485), (40, 100, 240)),
)
_BACKGROUNDS: tuple[str, ...] = (
    "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "brick", "grass",
    "gravel", "coins", "moon",
)
_PLAIN: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                           "immunohistochemistry", "camera", "coins")

CATEGORIES: list[dict[str, object]] = [
    {"id": cid, "name": name, "supercategory": "object"} for cid, name, *_ in _OBJECTS
]
NUM_CLASSES: int = 3  # category ids 0..2 -> model.num_classes=3
_SPLIT_CODES = {"train": 0, "val": 1, "unlabeled": 2}


@dataclass(frozen=True)
class DetectionSetPaths:
    """Where :func:`make_detection_set` wrote the data (ready for ``DataConfig``)."""

    root: Path
    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path
    num_classes: int = NUM_CLASSES


def photo_names() -> list[str]:
    """Every scikit-image photo the generator uses (backgrounds and plain crops)."""
    return sorted(set(_BACKGROUNDS) | set(_PLAIN))


def shipped_photo(name: str) -> np.ndarray:
    """One of :func:`photo_names` as ``[H, W, 3]`` uint8 RGB."""
    return _photo(name)


@cache
def _photo(name: str) -> np.ndarray:
    """An skimage sample photo as ``[H, W, 3]`` uint8 RGB (grey -> RGB, alpha dropped)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


@cache
def _object_patch(category: int) -> Image.Image:
    _, _, name, (y0, y1, x0, x1), _ = _OBJECTS[category]
    return Image.fromarray(_photo(name)[y0:y1, x0:x1])


def _size_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h < 32 or w < 32:
        raise ValueError(f"image_size must be at least 32x32 (got {h}x{w})")
    return int(h), int(w)


def _random_crop(rng: np.random.Generator, photo: np.ndarray, h: int, w: int,
                 min_frac: float) -> Image.Image:
    """A crop of ``photo`` with the aspect of ``(h, w)``, resized to ``(h, w)``."""
    ph, pw = photo.shape[:2]
    aspect = w / h
    ch = int(min(ph, pw / aspect) * rng.uniform(min_frac, 1.0))
    cw = max(1, min(pw, int(round(ch * aspect))))
    ch = max(1, ch)
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
    return crop.resize((w, h), Image.Resampling.BILINEAR)


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    name = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    bg = _random_crop(rng, _photo(name), h, w, 0.4)
    if rng.random() < 0.5:
        bg = bg.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    bg = bg.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 3.5))))
    dark = np.asarray(bg, dtype=np.float32) * rng.uniform(0.35, 0.6)
    return Image.fromarray(dark.clip(0, 255).astype(np.uint8))


def _render_object(rng: np.random.Generator, category: int, h: int, w: int) -> Image.Image:
    patch = _object_patch(category)
    oh = int(round(rng.uniform(0.25, 0.6) * h))
    aspect = patch.width / patch.height * rng.uniform(0.8, 1.25)
    ow = int(np.clip(round(oh * aspect), int(np.ceil(0.25 * w)), int(0.6 * w)))
    obj = patch.resize((ow, oh), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lit = np.asarray(obj, dtype=np.float32) * rng.uniform(0.85, 1.15)
    obj = Image.fromarray(lit.clip(0, 255).astype(np.uint8))
    border = max(2, int(round(0.04 * min(h, w))))
    ImageDraw.Draw(obj).rectangle((0, 0, ow - 1, oh - 1), outline=_OBJECTS[category][4],
                                  width=border)
    return obj


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def compose_image(
    rng: np.random.Generator, image_size: int | tuple[int, int], max_objects: int = 2
) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
    """The generator: one ``(h, w)`` RGB image and its objects (see the module docstring).

    Returns:
        ``(image, [(category_id, [x, y, w, h]), ...])`` with integer pixel COCO boxes that lie
        inside the image and do not overlap.
    """
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1 (got {max_objects})")
    h, w = _size_hw(image_size)
    image = _background(rng, h, w)
    n = int(rng.integers(1, max_objects + 1))
    objects: list[tuple[int, list[int]]] = []
    for _ in range(n):
        category = int(rng.integers(len(_OBJECTS)))
        obj = _render_object(rng, category, h, w)
        for _try in range(30):
            x = int(rng.integers(0, w - obj.width + 1))
            y = int(rng.integers(0, h - obj.height + 1))
            box = (x, y, obj.width, obj.height)
            if not any(_overlaps(box, tuple(b)) for _, b in objects):  # type: ignore[arg-type]
                image.paste(obj, (x, y))
                objects.append((category, list(box)))
                break
    return image, objects


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, _SPLIT_CODES[split], index])


def _write_split(out_dir: Path, split: str, n: int, image_size: tuple[int, int], seed: int,
                 max_objects: int) -> tuple[Path, Path]:
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image, objects = compose_image(_rng(seed, split, i), image_size, max_objects)
        file_name = f"{i:06d}.jpg"
        image.save(folder / file_name, format="JPEG", quality=90)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": image.height,
                       "width": image.width})
        for category, box in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                "iscrowd": 0, "segmentation": [],
            })
    ann_file = out_dir / f"{split}.json"
    doc = {
        "info": {"description": f"siamese_detr synthetic toy detection set ({split}, "
                                f"seed {seed}); see siamese_detr.demo.synthetic"},
        "images": images, "annotations": annotations, "categories": CATEGORIES,
    }
    ann_file.write_text(json.dumps(doc, indent=1))
    return folder, ann_file


def make_detection_set(
    out_dir: str | Path,
    n_train: int = 64,
    n_val: int = 16,
    image_size: int | tuple[int, int] = (176, 224),
    seed: int = 0,
    max_objects: int = 2,
) -> DetectionSetPaths:
    """Write a COCO-format toy detection set (see the module docstring).

    Layout: ``out_dir/train/000000.jpg ...``, ``out_dir/val/...``, ``out_dir/train.json``,
    ``out_dir/val.json``; image ids ``1..n`` per split, category ids 0..2
    (``model.num_classes=3``). Deterministic under ``seed``.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError("n_train and n_val must be >= 0")
    out = Path(out_dir)
    size = _size_hw(image_size)
    train_images, train_ann = _write_split(out, "train", n_train, size, seed, max_objects)
    val_images, val_ann = _write_split(out, "val", n_val, size, seed, max_objects)
    return DetectionSetPaths(root=out, train_images=train_images, train_ann=train_ann,
                             val_images=val_images, val_ann=val_ann)


def make_unlabeled_set(
    out_dir: str | Path,
    n: int = 64,
    image_size: int | tuple[int, int] = (176, 224),
    seed: int = 0,
    max_objects: int = 2,
) -> list[Path]:
    """Write ``n`` unlabeled JPEGs ``out_dir/000000.jpg ...`` for pretraining.

    Every fifth image (index ``i % 5 == 4``) is a plain random crop (50-100% of the short side)
    of one of the photos in ``_PLAIN`` (the object sources included, not blurred); the others
    come from :func:`compose_image`. Deterministic under ``seed``; returns the written paths.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = _size_hw(image_size)
    paths = []
    for i in range(n):
        rng = _rng(seed, "unlabeled", i)
        if i % 5 == 4:
            image = _random_crop(rng, _photo(_PLAIN[int(rng.integers(len(_PLAIN)))]), h, w, 0.5)
        else:
            image, _ = compose_image(rng, (h, w), max_objects)
        path = out / f"{i:06d}.jpg"
        image.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths
