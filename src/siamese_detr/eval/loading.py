"""One way in for trained weights: :func:`load_detector` and :func:`init_from_checkpoint`.

Both read any of: a ``siamese-detr pretrain`` checkpoint, a ``siamese-detr finetune``
checkpoint, or a converted upstream-layout file (``siamese-detr convert``), through the one
prefix normaliser :func:`siamese_detr.engine.checkpoint.detector_state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from siamese_detr.config import RunConfig
from siamese_detr.engine.checkpoint import detector_state, load_checkpoint
from siamese_detr.errors import ConfigError, UserError

__all__ = ["Detections", "InitReport", "LoadedDetector", "init_from_checkpoint",
           "load_detector", "must_finetune_first", "resolve_device"]


@dataclass
class Detections:
    """What :meth:`LoadedDetector.predict` finds in one image (tensors on the CPU, sorted by
    decreasing score).

    Attributes:
        boxes: ``[K, 4]`` float32 absolute ``x1, y1, x2, y2`` pixels of the input image,
            clipped to it (``0 <= x <= width``, ``0 <= y <= height``).
        scores: ``[K]`` float32 in [0, 1].
        labels: ``[K]`` int64 category ids (the COCO ``category_id`` of the training json).
        names: the ``K`` category names (``"class N"`` when the checkpoint has none).
        image_size: ``(height, width)`` of the input image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO result dicts ``{"image_id", "category_id", "bbox" [x, y, w, h], "score"}``."""
        from siamese_detr.eval.coco import to_coco_results

        return to_coco_results([image_id], [{"boxes": self.boxes, "scores": self.scores,
                                             "labels": self.labels}])


ImageInput = Any  # str | Path | PIL.Image.Image | numpy array (HWC) | Tensor (CHW)


def as_rgb_image(image: ImageInput) -> Any:
    """One user image -> an 8-bit RGB PIL image, the same pixels whatever the input type.

    ``str`` / ``Path``: decoded by :func:`siamese_detr.data.images.load_rgb`; PIL image: any
    mode; numpy array ``HxWx3`` (``HxW``, ``HxWx1``, ``HxWx4`` too) uint8 RGB (uint16 and float in
    [0, 1] are scaled to 8 bits); tensor ``3xHxW`` (or ``HxW``) uint8, or float in [0, 1]
    (``round(255 x)``), like torchvision's ``to_tensor`` output."""
    import numpy as np
    from PIL import Image

    from siamese_detr.data.images import load_rgb, to_uint8_rgb

    if isinstance(image, (str, Path)):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return to_uint8_rgb(image)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise UserError(f"an image tensor must be CxHxW (C = 1, 3 or 4) or HxW, got shape "
                            f"{tuple(image.shape)}")
        return to_uint8_rgb(t.numpy())
    if isinstance(image, np.ndarray):
        try:
            return to_uint8_rgb(image)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    raise UserError(f"cannot read an image from a {type(image).__name__}: give a path, a PIL "
                    "image, a HxWx3 uint8 numpy array or a 3xHxW tensor")


def _image_list(images: Any) -> list[Any]:
    """A single image or a sequence of them -> a list (4-D arrays / tensors are batches)."""
    import numpy as np
    from PIL import Image

    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, (Tensor, np.ndarray)):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Iterable):
        return list(images)
    return [images]


@dataclass
class LoadedDetector:
    """A detector ready for inference (``eval()`` mode, on ``device``) with the run
    configuration it was trained with and the names of its categories. This is the object
    the user API builds on: :meth:`predict`."""

    detector: nn.Module  # models.detector.Detector; ``detector.head_activation`` says its head
    config: RunConfig  # the stored config (or the one passed in for a converted file)
    kind: str  # "pretrain" | "finetune"
    path: Path
    step: int | None = None
    missing: list[str] = field(default_factory=list)  # keys left at initialisation
    categories: dict[int, str] = field(default_factory=dict)  # id -> name (from fine-tuning)

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    @property
    def can_detect(self) -> bool:
        """False for a pretraining checkpoint (pretext head) or a file without a class head."""
        return self.kind != "pretrain" and not any(_class_head(k) for k in self.missing)

    def category_name(self, label: int) -> str:
        return self.categories.get(int(label), f"class {int(label)}")

    def check_can_detect(self) -> None:
        """Raise the one-line :class:`UserError` of a checkpoint that cannot detect yet."""
        if not self.can_detect:
            raise UserError(must_finetune_first(self.path, self.kind))

    def predict(self, images: Any, score_threshold: float = 0.3, batch_size: int = 4,
                max_detections: int | None = None) -> list[Detections]:
        """Detect objects in ``images``.

        Args:
            images: one image or a list of them: paths, PIL images, numpy arrays ``HxWx3``
                uint8 RGB or tensors ``3xHxW`` (uint8, or float in [0, 1]); see
                :func:`as_rgb_image`. A 4-D array / tensor is a batch.
            score_threshold: detections scoring lower are dropped.
            batch_size: images per forward pass (padded to a common size, as in evaluation).
            max_detections: per image (default: the checkpoint's ``eval.max_detections``).

        Returns:
            one :class:`Detections` per image, in input order.

        Images are resized exactly as in evaluation (``data.val_size``, ``data.max_size``
        of the stored config) and run under ``torch.inference_mode`` through
        :func:`siamese_detr.eval.detection.detect`, the step ``evaluate`` uses.
        """
        self.check_can_detect()
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        pictures = [as_rgb_image(im) for im in _image_list(images)]
        return self.predict_rgb(pictures, score_threshold, batch_size, max_detections)

    def predict_rgb(self, pictures: Sequence[Any], score_threshold: float = 0.3,
                    batch_size: int = 4, max_detections: int | None = None
                    ) -> list[Detections]:
        """:meth:`predict` on images that are already 8-bit RGB PIL images."""
        from siamese_detr.data.collate import pad_images
        from siamese_detr.data.transforms import build_transforms
        from siamese_detr.eval.detection import detect

        self.check_can_detect()
        transform = build_transforms(self.config.data, train=False)
        limit = self.config.eval.max_detections if max_detections is None else max_detections
        device = self.device
        self.detector.eval()
        found: list[Detections] = []
        with torch.inference_mode():
            for start in range(0, len(pictures), batch_size):
                chunk = pictures[start:start + batch_size]
                batch = pad_images([transform(im, {})[0] for im in chunk]).to(device)
                orig = torch.tensor([[im.height, im.width] for im in chunk])
                for im, d in zip(chunk, detect(self.detector, batch, orig, limit,
                                               score_threshold, clip=True)):
                    labels = d["labels"].cpu()
                    found.append(Detections(
                        boxes=d["boxes"].float().cpu(), scores=d["scores"].float().cpu(),
                        labels=labels, names=[self.category_name(v) for v in labels.tolist()],
                        image_size=(im.height, im.width)))
        return found


def must_finetune_first(path: str | Path, kind: str) -> str:
    """The one line for a checkpoint that cannot detect (pretraining, or no class head)."""
    what = "a pretraining checkpoint" if kind == "pretrain" else "a file without a class head"
    return (f"{path} is {what}: it must be fine-tuned first (siamese-detr finetune --init "
            f"{path} data.train_ann=... ), then use the fine-tuning checkpoint")


def _class_head(key: str) -> bool:
    return key.startswith("class_embed")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the GPU when CUDA is available, else the CPU; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is visible; use device=auto "
                          "or device=cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device (use auto, cpu or cuda)"
                          ) from None


def stored_categories(ckpt: dict[str, Any]) -> dict[int, str]:
    """``{id: name}`` of a checkpoint's ``"categories"`` (``[{"id", "name"}]``, written at
    fine-tuning time from the training json); empty for older checkpoints."""
    cats = ckpt.get("categories")
    if not isinstance(cats, list):
        return {}
    return {int(c["id"]): str(c["name"]) for c in cats
            if isinstance(c, dict) and "id" in c and "name" in c}


def load_detector(path: str | Path, device: str | torch.device = "auto",
                  config: RunConfig | None = None, for_inference: bool = False
                  ) -> LoadedDetector:
    """Rebuild the detector of a checkpoint and load its weights.

    Args:
        path: our pretraining / fine-tuning checkpoint, a converted upstream-layout file,
            our safetensors folder (``siamese-detr export --to safetensors``, read without
            pickle) or a transformers DETR directory.
        device: where the detector goes; ``"auto"``: the GPU when there is one, else the CPU.
        config: the RunConfig to build from when the file has none (converted files);
            ignored when the file stores one.
        for_inference: refuse a pretraining checkpoint at once (:class:`UserError`, "must be
            fine-tuned first"), before building anything.

    Returns:
        :class:`LoadedDetector`. A pretraining checkpoint gives the detector with its 2-way
        pretext class head; a converted pretraining file has no class head (``missing``).

    Raises:
        ConfigError: unreadable file, no stored config and none given, or weights that do not
            fit the configured detector (names the first offending key).
    """
    from siamese_detr.configio import from_dict
    from siamese_detr.convert.source import read_checkpoint_or_folder
    from siamese_detr.models.detector import build_detector_from_config

    path = Path(path)
    ckpt = read_checkpoint_or_folder(path)  # .pt (safe load), our folder or transformers dir
    stored = ckpt.get("config")
    if isinstance(stored, dict):
        cfg = from_dict(stored)
    elif config is not None:
        cfg = config
    else:
        raise ConfigError(f"{path} stores no config (a converted file?): pass "
                          "config=RunConfig, e.g. load_detector(path, config=get_preset(NAME))")
    normalised = detector_state(ckpt)
    if for_inference and normalised.kind == "pretrain":
        raise UserError(must_finetune_first(path, "pretrain"))
    # the weights come from the file: do not read the backbone weights file again
    build_cfg = replace(cfg, model=replace(cfg.model, backbone=replace(cfg.model.backbone,
                                                                       weights="")))
    if normalised.kind == "pretrain" and cfg.task != "pretrain":
        build_cfg = replace(build_cfg, task="pretrain")  # a pretext head, whatever cfg says
    detector = build_detector_from_config(build_cfg)
    state = normalised.detector()
    own = detector.state_dict()
    for k, v in state.items():
        if k not in own:
            raise ConfigError(f"{path}: '{k}' is not a parameter of the configured "
                              f"{cfg.model.variant} detector")
        if own[k].shape != v.shape:
            raise ConfigError(f"{path}: '{k}' has shape {tuple(v.shape)} but the configured "
                              f"detector expects {tuple(own[k].shape)}")
    missing = [k for k in own if k not in state]
    if any(not _class_head(k) for k in missing) and len(missing) > 0.5 * len(own):
        raise ConfigError(f"{path} covers only {len(state)} of {len(own)} tensors of the "
                          "configured detector")
    detector.load_state_dict(state, strict=False)
    detector.to(resolve_device(device)).eval()
    step = ckpt.get("step")
    return LoadedDetector(detector, cfg, normalised.kind, path,
                          int(step) if isinstance(step, int) else None, missing,
                          stored_categories(ckpt))


@dataclass
class InitReport:
    loaded: int
    skipped_shape: list[str]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        return (f"loaded {self.loaded} tensors; re-initialised (shape differs) "
                f"{len(self.skipped_shape)}: {self.skipped_shape[:4]}; "
                f"missing {len(self.missing)}: {self.missing[:4]}; "
                f"unexpected {len(self.unexpected)}: {self.unexpected[:4]}")


def init_from_checkpoint(detector: nn.Module, path: str | Path, variant: str) -> InitReport:
    """Initialise a fine-tuning ``detector`` from a checkpoint (``init=``), our safetensors
    folder or a transformers DETR / Conditional / Deformable DETR directory; the class head is
    re-initialised when its shape differs (a pretext head or another label set)."""
    hint = ""
    if Path(path).is_dir():
        from siamese_detr.convert.source import read_checkpoint_or_folder

        ckpt = read_checkpoint_or_folder(path)
        model = ckpt["config"]["model"]
        hint = " (its config: " + " ".join(
            f"model.{k}={model[k]}" for k in ("hidden_dim", "nheads", "enc_layers", "dec_layers",
                                                "dim_feedforward", "num_queries")) + ")"
    else:
        ckpt = load_checkpoint(path)
    stored = ckpt.get("config", {}).get("model", {}).get("variant") if isinstance(
        ckpt.get("config"), dict) else None
    if stored is not None and stored != variant:
        raise ConfigError(f"--init {path} holds a {stored} detector but model.variant={variant}; "
                          f"use a {variant} checkpoint or set model.variant={stored}")
    state = detector_state(ckpt).detector()
    own = detector.state_dict()
    usable, skipped = {}, []
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            if "class_embed" in k:
                skipped.append(k)
                continue
            raise ConfigError(f"--init {path}: '{k}' has shape {tuple(v.shape)} but the model "
                              f"expects {tuple(own[k].shape)} (check model.num_queries, "
                              f"hidden_dim and layer counts){hint}")
        usable[k] = v
    result = detector.load_state_dict(usable, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("class_embed")]
    if len(missing) > 0.5 * len(own):
        raise ConfigError(f"--init {path} matches only {len(usable)} of {len(own)} tensors of "
                          "this model: is it a checkpoint of the same detector?")
    return InitReport(len(usable), skipped, list(result.missing_keys),
                      list(result.unexpected_keys))
