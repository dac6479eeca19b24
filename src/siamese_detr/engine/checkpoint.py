"""Checkpoints: atomic save, safe load (``weights_only=True``), RNG capture for exact resume.

A checkpoint is a plain dict::

    {"kind": "pretrain" | "finetune", "step": int, "model": state_dict, "config": dict,
     "optimizer": ..., "scaler": ..., "rng": {...}, "metrics": {...}}

Only tensors and plain Python containers are stored, so ``torch.load(weights_only=True)`` reads
it and a checkpoint downloaded from the internet cannot run code.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siamese_detr.config import ConfigError


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def detector_state_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The detector's state dict inside one of our checkpoints (pretraining or fine-tuning)
    or a plain/``{"model": ...}`` detector state dict."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict):
        raise ConfigError("checkpoint has no 'model' state dict")
    if any(k.startswith("detector.") for k in state):
        return {k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")}
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    # upstream layouts (facebookresearch/detr and derivatives) call the backbone backbone.0.body
    return {("backbone.body." + k[len("backbone.0.body."):] if k.startswith("backbone.0.body.")
             else k): v for k, v in state.items()}


def rotate_checkpoints(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest ``step_*.pt`` files in ``folder``."""
    files = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for old in files[: max(0, len(files) - keep)]:
        old.unlink(missing_ok=True)
