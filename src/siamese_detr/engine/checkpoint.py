"""Checkpoints: atomic save, safe load (``weights_only=True``), RNG capture for exact resume.

A checkpoint is a plain dict::

    {"kind": "pretrain" | "finetune", "step": int, "model": state_dict, "config": dict,
     "optimizer": ..., "scaler": ..., "rng": {...}, "metrics": {...}}

Only tensors and plain Python containers are stored, so ``torch.load(weights_only=True)`` reads
it and a checkpoint downloaded from the internet cannot run code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siamese_detr.errors import ConfigError
from siamese_detr.files import write_torch


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, seq, gauss = state["python"]
    random.setstate((version, tuple(seq), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` atomically (temporary file in the same folder, then ``os.replace``)."""
    write_torch(path, payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; a missing or unreadable file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, code-carrying pickles
        if "Weights only load failed" in str(exc) and "GLOBAL" in str(exc):
            raise ConfigError(f"checkpoint {path} cannot be read safely: it holds Python objects "
                              "besides tensors (it could run code); if you trust it, load it "
                              "yourself and re-save its state dict") from None
        raise ConfigError(f"checkpoint {path} cannot be read safely: not a readable PyTorch "
                          f"checkpoint (corrupt, truncated or another format; "
                          f"{exc.__class__.__name__})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {path} is not a dict of tensors")
    return ckpt


UPSTREAM_BACKBONE = "backbone.0.body."  # facebookresearch/detr and derivatives
OUR_BACKBONE = "backbone.body."


@dataclass
class DetectorState:
    """A checkpoint's weights in our ``Detector`` names (see :func:`detector_state`).

    ``state`` keeps the file's key order; ``pretext`` names the keys that are not the
    detector's (pretext heads of a pretraining checkpoint, a fine-tuning criterion's buffers).
    """

    state: dict[str, torch.Tensor]
    kind: str  # "pretrain" | "finetune" (stored, else inferred)
    pretext: frozenset[str] = frozenset()

    def detector(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if k not in self.pretext}


def upstream_to_internal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``backbone.0.body.*`` (upstream layout) -> ``backbone.body.*``; other keys unchanged."""
    return {(OUR_BACKBONE + k[len(UPSTREAM_BACKBONE):] if k.startswith(UPSTREAM_BACKBONE)
             else k): v for k, v in state.items()}


def detector_state(ckpt: dict[str, Any]) -> DetectorState:
    """The one checkpoint-prefix normaliser: our pretraining / fine-tuning checkpoints
    (``{"model": task state}``, detector under ``detector.``), DDP ``module.`` prefixes,
    plain or ``{"model": ...}`` detector state dicts and converted upstream-layout files.

    ``module.`` and ``detector.`` are stripped, the upstream backbone prefix is renamed; when
    the file has ``detector.*`` keys, the others are listed in ``pretext``. The kind is the
    stored ``"kind"``, else ``"pretrain"`` when there are ``detector.*`` keys, else
    ``"finetune"``.
    """
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict):
        raise ConfigError("checkpoint has no 'model' state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    has_detector = any(k.startswith("detector.") for k in state)
    pretext = frozenset(k for k in state if has_detector and not k.startswith("detector."))
    state = upstream_to_internal({k.removeprefix("detector."): v for k, v in state.items()})
    kind = str(ckpt.get("kind") or ("pretrain" if has_detector else "finetune"))
    return DetectorState(state, kind, pretext)


def rotate_checkpoints(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest ``step_*.pt`` files in ``folder``."""
    files = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for old in files[: max(0, len(files) - keep)]:
        old.unlink(missing_ok=True)
