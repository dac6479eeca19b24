"""Read any detector source into one checkpoint-shaped dict and build the detector.

Sources: our ``.pt`` checkpoint (pretraining or fine-tuning), our folder
(``model.safetensors`` + ``config.yaml``, :mod:`siamese_detr.convert.folder`) or a
transformers directory (:mod:`siamese_detr.convert.hf`). The result is
``{"model": detector state dict, "config": RunConfig dict, "kind", "categories"}`` with the
detector's weights in our names (pretext modules of a pretraining checkpoint left out).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from siamese_detr.config import RunConfig
from siamese_detr.errors import ConfigError

__all__ = ["build_from_source", "read_checkpoint_or_folder", "read_source"]


def _categories(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    cats = ckpt.get("categories") or []
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]


def read_checkpoint_or_folder(path: str | Path) -> dict[str, Any]:
    """A checkpoint-shaped dict from our ``.pt`` file (safe load), our folder or a
    transformers directory; folders are read without pickle."""
    from siamese_detr.convert import folder, hf
    from siamese_detr.engine.checkpoint import load_checkpoint

    p = Path(path)
    if folder.is_folder(p):
        try:
            return folder.load_folder(p)
        except folder.FolderError as exc:
            raise ConfigError(str(exc)) from None
    if hf.is_hf_dir(p):
        return _read_hf(p)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder but neither a detector folder (model.safetensors + "
                          "config.yaml) nor a transformers directory (config.json)")
    return load_checkpoint(p)


def _read_hf(p: Path) -> dict[str, Any]:
    from siamese_detr.configio import from_dict, to_dict
    from siamese_detr.convert import hf

    try:
        imp = hf.read_hf_dir(p)
    except hf.HfError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    if imp.unmapped:
        raise ConfigError(f"{p}: {len(imp.unmapped)} weights have no counterpart in our "
                          f"detector (first: {imp.unmapped[:3]})")
    cfg = from_dict({"model": imp.model, "loss": {"cls_loss": "auto"}})
    cats = [{"id": i, "name": n} for i, n in sorted(imp.id2label.items()) if n != "N/A"]
    return {"model": imp.state, "config": to_dict(cfg), "kind": "finetune", "categories": cats}


def read_source(path: str | Path) -> dict[str, Any]:
    """Our checkpoint, our folder or a transformers directory -> a checkpoint-shaped dict
    (see the module docstring). Raises :class:`ConfigError` with the reason."""
    from siamese_detr.engine.checkpoint import detector_state

    ckpt = read_checkpoint_or_folder(path)
    if not isinstance(ckpt.get("config"), dict) or "model" not in ckpt["config"]:
        raise ConfigError(f"{path} has no stored config (model.variant unknown): export it "
                          "from a siamese-detr checkpoint")
    normalised = detector_state(ckpt)
    return {"model": normalised.detector(), "config": ckpt["config"], "kind": normalised.kind,
            "categories": _categories(ckpt)}


def build_from_source(source: dict[str, Any]) -> tuple[nn.Module, RunConfig]:
    """The detector of a :func:`read_source` dict with its weights loaded strictly (eval
    mode, CPU), and the stored ``RunConfig``."""
    from siamese_detr.configio import from_dict
    from siamese_detr.models.detector import build_detector_from_config

    cfg = from_dict({k: v for k, v in source["config"].items() if k != "init"})
    build = replace(cfg, model=replace(cfg.model, backbone=replace(cfg.model.backbone,
                                                                   weights="")))
    if source.get("kind") == "pretrain" and cfg.task != "pretrain":
        build = replace(build, task="pretrain")
    detector = build_detector_from_config(build)
    missing, unexpected = detector.load_state_dict(source["model"], strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(f"stored weights do not fit the stored config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return detector.eval(), cfg
