"""``engine.compile=true``: ``torch.compile`` of the detectors' transformer stacks.

Every ``Detector`` inside a task gets its transformer's ``encoder`` and ``decoder`` compiled
in place (``nn.Module.compile``: parameter names and checkpoints are unchanged) with
``dynamic=True``, so the variable image sizes of DETR's multi-scale augmentation reuse one
graph instead of recompiling per size. The multi-scale deformable attention core is left
out of the graphs (``torch.compiler.disable`` in ``ops/deform_attn.py``): it runs its own
Triton kernels. The backbone is not compiled (frozen BatchNorm convolutions gain little from
it and would recompile per input size).
"""

from __future__ import annotations

from torch import nn

__all__ = ["compile_transformers"]


def compile_transformers(task: nn.Module, **options: object) -> list[str]:
    """Compile, in place, the encoder and decoder of every detector in ``task``; return the
    names of the compiled modules. ``options`` go to ``torch.compile`` (``dynamic=True``
    unless given)."""
    from siamese_detr.models.detector import Detector

    options.setdefault("dynamic", True)
    done = []
    for name, module in task.named_modules():
        if not isinstance(module, Detector):
            continue
        for part in ("encoder", "decoder"):
            sub = getattr(module.transformer, part, None)
            if isinstance(sub, nn.Module):
                sub.compile(**options)  # type: ignore[arg-type]
                done.append(f"{name + '.' if name else ''}transformer.{part}")
    return done
