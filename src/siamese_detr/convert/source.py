"""Read any detector source into one checkpoint-shaped dict and build the detector.

Sources: our ``.pt`` checkpoint (pretraining or fine-tuning), our folder
(``model.safetensors`` + ``config.yaml``, :mod:`siamese_detr.convert.folder`) or a
transformers directory (:mod:`siamese_detr.convert.hf`). The result is
``{"model": detector state dict, "config": RunConfig dict, "kind", "categories"}`` with the
detector's weights in our names (pretext modules of a pretraining checkpoint left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from siamese_detr.config import ConfigError, RunConfig

__all__ = ["build_from_source", "class_head_width", "read_source"]


def _categories(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    cats = ckpt.get("categories") or []
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]


def read_source(path: str | Path) -> dict[str, Any]:
    """Our checkpoint, our folder or a transformers directory -> a checkpoint-shaped dict
    (see the module docstring). Raises :class:`ConfigError` with the reason."""
    from siamese_detr.configio import to_dict
    from siamese_detr.convert import folder, hf
    from siamese_detr.engine.checkpoint import detector_state_from_checkpoint, load_checkpoint

    p = Path(path)
    if folder.is_folder(p):
        try:
            ckpt = folder.load_folder(p)
        except folder.FolderError as exc:
            raise ConfigError(str(exc)) from None
    elif hf.is_hf_dir(p):
        try:
            imp = hf.read_hf_dir(p)
        except hf.HfError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        if imp.unmapped:
            raise ConfigError(f"{p}: {len(imp.unmapped)} weights have no counterpart in our "
                              f"detector (first: {imp.unmapped[:3]})")
        from siamese_detr.configio import from_dict

        cfg = from_dict({"model": imp.model, "loss": {"cls_loss": "auto"}})
        cats = [{"id": i, "name": n} for i, n in sorted(imp.id2label.items()) if n != "N/A"]
        return {"model": imp.state, "config": to_dict(cfg), "kind": "finetune",
                "categories": cats}
    elif p.is_dir():
        raise ConfigError(f"{p} is a folder but neither a detector folder (model.safetensors + "
                          "config.yaml) nor a transformers directory (config.json)")
    else:
        ckpt = load_checkpoint(p)
    if not isinstance(ckpt.get("config"), dict) or "model" not in ckpt["config"]:
        raise ConfigError(f"{p} has no stored config (model.variant unknown): re-export it "
                          "from a siamese-detr checkpoint")
    state = detector_state_from_checkpoint(ckpt)
    from siamese_detr.convert.detr import PRETEXT_DROPS

    state = {k: v for k, v in state.items() if not k.startswith(
        tuple(prefix for prefix, _ in PRETEXT_DROPS))}
    kind = str(ckpt.get("kind") or "finetune")
    return {"model": state, "config": ckpt["config"], "kind": kind,
            "categories": _categories(ckpt)}


def class_head_width(state: dict[str, Tensor]) -> int | None:
    """Columns of the stored class head (``class_embed[.0].weight``), None when absent."""
    for key in ("class_embed.weight", "class_embed.0.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def build_from_source(source: dict[str, Any]) -> tuple[nn.Module, RunConfig]:
    """The detector of a :func:`read_source` dict with its weights loaded strictly (eval
    mode, CPU), and the stored ``RunConfig``."""
    from siamese_detr.configio import from_dict
    from siamese_detr.losses.set_criterion import num_logits
    from siamese_detr.models.detector import build_detector

    raw = dict(source["config"])
    raw.pop("init", None)
    cfg = from_dict(raw)
    model_cfg = cfg.model
    if model_cfg.backbone.weights:  # the file's weights replace the backbone file's
        from dataclasses import replace

        model_cfg = replace(model_cfg, backbone=replace(model_cfg.backbone, weights=""))
    width = class_head_width(source["model"]) or num_logits(model_cfg, cfg.loss)
    detector = build_detector(model_cfg, width)
    missing, unexpected = detector.load_state_dict(source["model"], strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(f"stored weights do not fit the stored config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return detector.eval(), cfg
