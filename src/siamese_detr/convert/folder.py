"""Our pickle-free detector folder: ``model.safetensors`` + ``config.yaml``.

* ``model.safetensors``: the detector's state dict in our names (``backbone.body.*``,
  ``transformer.*``, ``class_embed.*`` ...), every tensor stored on its own (shared heads
  are written once per name). Its string metadata holds ``siamese_detr.kind``
  ("pretrain" | "finetune"), ``siamese_detr.categories`` (json list of ``{"id", "name"}``,
  may be empty) and ``siamese_detr.format`` (version of this layout, 1).
* ``config.yaml``: the run's full config (a ``RunConfig`` YAML: ``siamese-detr finetune
  --config`` reads it).

:func:`load_folder` returns the same dict shape as a ``.pt`` checkpoint
(``{"model", "config", "kind", "categories"}``), so every checkpoint reader accepts it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from siamese_detr.files import write_bytes

__all__ = ["FORMAT_VERSION", "FolderError", "is_folder", "load_folder", "safetensors_bytes",
           "save_folder"]

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


class FolderError(ValueError):
    """A folder that is not a readable siamese-detr detector folder (one line)."""


def safetensors_bytes(state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise ``state`` (each tensor copied: safetensors refuses shared storage)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return save(tensors, metadata=dict(metadata))


def save_folder(path: str | Path, state: Mapping[str, Tensor], config: Mapping[str, Any],
                kind: str, categories: list[Mapping[str, Any]] | None = None) -> Path:
    """Write ``state`` (our detector names) and ``config`` (a RunConfig dict) to ``path``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt",
        "siamese_detr.format": str(FORMAT_VERSION),
        "siamese_detr.kind": kind,
        "siamese_detr.categories": json.dumps(
            [{"id": int(c["id"]), "name": str(c["name"])} for c in categories or []]),
    }
    write_bytes(folder / WEIGHTS, safetensors_bytes(state, meta))
    text = yaml.safe_dump(json.loads(json.dumps(dict(config))), sort_keys=False)
    write_bytes(folder / CONFIG, text.encode())
    return folder


def is_folder(path: str | Path) -> bool:
    """True for a folder holding ``model.safetensors`` and ``config.yaml``."""
    p = Path(path)
    return p.is_dir() and (p / WEIGHTS).is_file() and (p / CONFIG).is_file()


def load_folder(path: str | Path) -> dict[str, Any]:
    """Read a folder written by :func:`save_folder` (no pickle anywhere).

    Returns ``{"model": state_dict, "config": dict, "kind": str, "categories": list}``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(path)
    if not is_folder(folder):
        raise FolderError(f"{folder} is not a detector folder (needs {WEIGHTS} and {CONFIG})")
    try:
        with safe_open(str(folder / WEIGHTS), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any reader failure is a file problem
        raise FolderError(f"{folder / WEIGHTS} is not a readable safetensors file "
                          f"({type(exc).__name__})") from None
    version = int(meta.get("siamese_detr.format", "0") or 0)
    if version > FORMAT_VERSION:
        raise FolderError(f"{folder} has folder format {version}; this siamese-detr reads up "
                          f"to {FORMAT_VERSION} (upgrade siamese-detr)")
    try:
        config = yaml.safe_load((folder / CONFIG).read_text())
    except yaml.YAMLError as exc:
        raise FolderError(f"{folder / CONFIG} is not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise FolderError(f"{folder / CONFIG} does not hold a config mapping")
    return {
        "model": state,
        "config": config,
        "kind": meta.get("siamese_detr.kind", "finetune"),
        "categories": json.loads(meta.get("siamese_detr.categories", "[]")),
    }
