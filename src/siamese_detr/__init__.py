"""siamese-detr: self-supervised pretraining and fine-tuning of DETR-family detectors.

The public Python API (each name is imported on first use, so ``import siamese_detr`` does
not import torch)::

    import siamese_detr as sd

    cfg = sd.get_preset("tiny/conditional/finetune")       # a RunConfig
    metrics = sd.run(cfg)                                  # train (and evaluate) it
    loaded = sd.load_detector("runs/x/last.pt")            # any of our checkpoints
    detector, cfg = loaded.detector, loaded.config

- :func:`get_preset` / :class:`RunConfig` (:mod:`siamese_detr.presets`, :mod:`.config`);
- :func:`run` (:mod:`siamese_detr.runner`): build the task the config names and train it;
- :func:`build_detector` (:func:`siamese_detr.models.detector.build_detector_from_config`):
  the untrained detector of a RunConfig;
- :func:`load_detector` (:mod:`siamese_detr.eval.loading`): a pretraining or fine-tuning
  checkpoint or a converted file -> :class:`LoadedDetector` (detector + its RunConfig);
- :func:`apply_overrides` (``key.sub=value`` strings), :class:`ConfigError`, :class:`UserError`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOME = {
    "RunConfig": ("siamese_detr.config", "RunConfig"),
    "get_preset": ("siamese_detr.presets", "get_preset"),
    "apply_overrides": ("siamese_detr.configio", "apply_overrides"),
    "run": ("siamese_detr.runner", "run"),
    "build_detector": ("siamese_detr.models.detector", "build_detector_from_config"),
    "load_detector": ("siamese_detr.eval.loading", "load_detector"),
    "LoadedDetector": ("siamese_detr.eval.loading", "LoadedDetector"),
    "ConfigError": ("siamese_detr.errors", "ConfigError"),
    "UserError": ("siamese_detr.errors", "UserError"),
}
__all__ = ["__version__", *_HOME]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'siamese_detr' has no attribute {name!r}")
    module, attr = _HOME[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
