"""COCO-format detection data set (images folder + instances json), read with pycocotools.

Labels are the COCO ``category_id`` itself (DETR's convention), so ``model.num_classes`` must
be greater than the largest category id. Crowd annotations are dropped and boxes clipped to
the image, as DETR's ``ConvertCocoPolysToMask`` does.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from siamese_detr.config import ConfigError
from siamese_detr.data.images import IMAGE_ERRORS, load_rgb
from siamese_detr.data.transforms import Compose, NormalizeBoxes, ToUint8Tensor, Transform
from siamese_detr.data.validate import sanitize_coco
from siamese_detr.structures import BoxTargets

__all__ = ["CocoDetection", "load_coco_target"]

log = logging.getLogger("siamese_detr")


def load_coco_target(anns: list[dict[str, Any]], height: int, width: int) -> dict[str, Tensor]:
    """COCO annotations of one image -> target dict (DETR's ``ConvertCocoPolysToMask``).

    Returns ``boxes`` ``[K, 4]`` float32 absolute xyxy clipped to ``(width, height)``,
    ``labels`` ``[K]`` int64 (= category_id), ``area`` ``[K]`` float32 (json ``area``, box
    area when absent), ``iscrowd`` ``[K]`` int64 (all 0) and ``size`` ``[2]`` ``(h, w)``.
    Crowd objects and boxes that are empty after clipping are removed.
    """
    anns = [a for a in anns if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    labels = torch.as_tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
    area = torch.as_tensor(
        [float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=torch.float32
    )
    iscrowd = torch.zeros(len(anns), dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "size": torch.tensor([height, width], dtype=torch.int64),
    }


class CocoDetection(Dataset):
    """``dataset[i] -> (image [3, H, W] float32 normalised, BoxTargets)``.

    ``BoxTargets``: ``boxes`` normalised cxcywh relative to the transformed image, ``labels`` =
    category_id, ``image_id`` = COCO image id, ``size`` = fed ``(h, w)``, ``orig_size`` = on-disk
    ``(h, w)``, ``area`` (scaled with the image) and ``iscrowd``.

    Args:
        image_folder: folder the json's ``file_name`` entries are relative to.
        ann_file: COCO instances json.
        transforms: joint transform ``(PIL image, target dict) -> (Tensor, target dict)`` ending
            with :class:`~siamese_detr.data.transforms.Normalize` (boxes normalised cxcywh);
            ``None`` means ToTensor + Normalize only.
        num_classes: when given, every ``category_id`` must lie in ``[0, num_classes)``,
            otherwise :class:`ConfigError` is raised at construction.

    Attributes:
        coco: the pycocotools ``COCO`` object (for evaluation).
        ids: sorted COCO image ids; ``dataset[i]`` is image ``ids[i]``.
    """

    def __init__(
        self,
        image_folder: str | Path,
        ann_file: str | Path,
        transforms: Transform | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.image_folder = Path(image_folder)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise ConfigError(
                f"annotation file {str(self.ann_file)!r} does not exist; check data.train_ann / "
                "data.val_ann"
            )
        if not self.image_folder.is_dir():
            raise ConfigError(
                f"image folder {str(self.image_folder)!r} does not exist; check "
                "data.train_images / data.val_images"
            )
        self.coco = self._load(self.ann_file)
        self.problems = sanitize_coco(self.coco, self.ann_file, self.image_folder)
        self.ids: list[int] = sorted(self.coco.imgs.keys())
        self.transforms: Transform = transforms or Compose([ToUint8Tensor(), NormalizeBoxes()])
        self.num_classes = num_classes
        self._unreadable: set[int] = set()
        self._check_labels(num_classes)

    @staticmethod
    def _load(path: Path) -> COCO:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(str(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"annotation file {str(path)!r} is not valid json ({exc})") from exc
        except (KeyError, TypeError, AssertionError) as exc:
            raise ConfigError(
                f"annotation file {str(path)!r} is not COCO instances json (needs 'images', "
                f"'annotations', 'categories'; problem: {exc!r})"
            ) from exc
        return coco

    def _check_labels(self, num_classes: int | None) -> None:
        cat_ids = {int(a["category_id"]) for a in self.coco.anns.values()}
        if not cat_ids:
            return
        low, high = min(cat_ids), max(cat_ids)
        if low < 0:
            raise ConfigError(
                f"{str(self.ann_file)!r}: negative category_id {low}; category ids must be >= 0"
            )
        if num_classes is not None and high >= num_classes:
            raise ConfigError(
                f"{str(self.ann_file)!r} has category_id {high} but model.num_classes="
                f"{num_classes}; set model.num_classes to at least {high + 1} (labels are the "
                "COCO category ids)"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.image_folder / self.coco.imgs[self.ids[index]]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        path = self.image_path(index)
        if not path.is_file():
            raise ConfigError(
                f"image {str(path)!r} listed in {str(self.ann_file)!r} does not exist; check "
                "the image folder (data.train_images / data.val_images)"
            )
        info = self.coco.imgs[self.ids[index]]
        expected = (info["width"], info["height"]) if "width" in info and "height" in info \
            else None
        return load_rgb(path, expected_size=expected)

    def __getitem__(self, index: int) -> tuple[Tensor, BoxTargets] | None:
        """The sample, or ``None`` when its image cannot be decoded (warned once; the
        collate function drops it and counts it as skipped)."""
        image_id = self.ids[index]
        try:
            image = self.load_image(index)
        except ConfigError:  # a missing file: the folder setting is wrong, not the image
            raise
        except IMAGE_ERRORS as exc:
            if image_id not in self._unreadable:
                self._unreadable.add(image_id)
                log.warning("unreadable image %s (%s: %s): skipped", self.image_path(index),
                            type(exc).__name__, exc)
            return None
        anns = self.coco.imgToAnns.get(image_id, [])
        target = load_coco_target(anns, image.height, image.width)
        orig_size = target["size"].clone()
        out, target = self.transforms(image, target)
        if not isinstance(out, Tensor):
            raise TypeError("CocoDetection transforms must end with ToTensor + Normalize")
        size = torch.tensor([out.shape[-2], out.shape[-1]], dtype=torch.int64)
        return out, BoxTargets(
            boxes=target["boxes"].to(torch.float32).reshape(-1, 4),
            labels=target["labels"],
            image_id=int(image_id),
            size=size,
            orig_size=orig_size,
            area=target["area"],
            iscrowd=target["iscrowd"],
        )
