"""One way in for trained weights: :func:`load_detector` and :func:`init_from_checkpoint`.

Both read any of: a ``siamese-detr pretrain`` checkpoint, a ``siamese-detr finetune``
checkpoint, or a converted upstream-layout file (``siamese-detr convert``), through the one
prefix normaliser :func:`siamese_detr.engine.checkpoint.detector_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from siamese_detr.config import RunConfig
from siamese_detr.engine.checkpoint import detector_state, load_checkpoint
from siamese_detr.errors import ConfigError

__all__ = ["InitReport", "LoadedDetector", "init_from_checkpoint", "load_detector"]


@dataclass
class LoadedDetector:
    """A detector ready for inference (``eval()`` mode, on ``device``) with the run
    configuration it was trained with. This is the object the user API builds on
    (``predict`` and friends are added here)."""

    detector: nn.Module  # models.detector.Detector; ``detector.head_activation`` says its head
    config: RunConfig  # the stored config (or the one passed in for a converted file)
    kind: str  # "pretrain" | "finetune"
    path: Path
    step: int | None = None
    missing: list[str] = field(default_factory=list)  # keys left at initialisation


def _class_head(key: str) -> bool:
    return key.startswith("class_embed")


def load_detector(path: str | Path, device: str | torch.device = "cpu",
                  config: RunConfig | None = None) -> LoadedDetector:
    """Rebuild the detector of a checkpoint and load its weights.

    Args:
        path: our pretraining / fine-tuning checkpoint, a converted upstream-layout file,
            our safetensors folder (``siamese-detr export --to safetensors``, read without
            pickle) or a transformers DETR directory.
        device: where the detector goes.
        config: the RunConfig to build from when the file has none (converted files);
            ignored when the file stores one.

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
    detector.to(device).eval()
    step = ckpt.get("step")
    return LoadedDetector(detector, cfg, normalised.kind, path,
                          int(step) if isinstance(step, int) else None, missing)


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
