"""The toy-scale demo (``siamese-detr demo``): generated data, a label-free stand-in backbone,
the whole pipeline and a report.

Modules: :mod:`.synthetic` (toy data from scikit-image photos), :mod:`.photo_backbone` (the
label-free ResNet-18 warm-up), :mod:`.demo` (the stages, ``run_demo``), :mod:`.report`
(figures and ``report.md``; imports nothing of :mod:`.demo`). The names of :mod:`.demo` are
available here too, imported on first use so that ``import siamese_detr.demo.synthetic``
stays light.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("siamese_detr.demo.demo")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'siamese_detr.demo' has no attribute {name!r}") from None
