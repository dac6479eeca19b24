"""Inference, scoring and loading of trained detectors.

- :mod:`.loading`: :func:`load_detector` (any of our checkpoints or a converted file ->
  :class:`LoadedDetector`), :func:`init_from_checkpoint` (fine-tuning ``init=``);
- :mod:`.detection`: :func:`predict`, :func:`score`, :func:`evaluate_detector`;
- :mod:`.postprocess`, :mod:`.coco`, :mod:`.voc`: the pieces.

The names above are importable from here; they load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "load_detector": "loading", "LoadedDetector": "loading", "init_from_checkpoint": "loading",
    "InitReport": "loading", "predict": "detection", "score": "detection",
    "evaluate_detector": "detection", "describe_metrics": "detection",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'siamese_detr.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"siamese_detr.eval.{_HOME[name]}"), name)
