"""Convert our checkpoints to the layouts of the upstream DETR-family repositories.

``convert_checkpoint(ckpt, target)`` takes one of our checkpoint dicts
(``{"model": state_dict, "config": RunConfig-as-dict, "kind": "pretrain" | "finetune"}``) and
returns ``(state_dict, ConversionReport)`` in the target's key names. Save it as
``{"model": state_dict}`` (:func:`wrap_upstream`), which is what the upstream ``--resume`` /
``--pretrain`` loaders read.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from siamese_detr.convert import conditional, deformable, detr
from siamese_detr.convert.keymap import ConversionReport, apply_keymap
from siamese_detr.engine.checkpoint import detector_state, upstream_to_internal

__all__ = [
    "TARGETS",
    "ConversionError",
    "ConversionReport",
    "convert_checkpoint",
    "to_internal",
    "wrap_upstream",
]

TARGETS = {m.TARGET: m for m in (detr, conditional, deformable)}


class ConversionError(ValueError):
    """The checkpoint cannot be converted to the requested target."""


def _detector_state(ckpt: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """All weights (pretext heads included, so that the report names them) in our names."""
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConversionError("not a siamese-detr checkpoint (no 'model' entry)")
    normalised = detector_state(ckpt)
    return normalised.state, normalised.kind


def convert_checkpoint(
    ckpt: dict[str, Any], target: str, keep_class_embed: bool | None = None
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map a checkpoint's detector weights to ``target``'s parameter names.

    Args:
        ckpt: our checkpoint dict (``model``, ``config``, ``kind``).
        target: ``"detr"``, ``"conditional-detr"`` or ``"deformable-detr"``; must match the
            stored ``model.variant`` (vanilla, conditional, deformable).
        keep_class_embed: keep ``class_embed.*``; default: drop for pretraining checkpoints
            (2-way pretext head), keep for fine-tuned ones.

    Returns:
        The flat upstream state dict and a report (mapped / dropped with reasons / unmapped).

    Raises:
        ConversionError: unknown target, or the target does not match the stored variant.
    """
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    module = TARGETS[target]
    config = ckpt.get("config") or {}
    variant = (config.get("model") or {}).get("variant")
    if variant is None:
        raise ConversionError("checkpoint has no stored config (model.variant unknown)")
    if variant != module.VARIANT:
        expected = next((t for t, m in TARGETS.items() if variant == m.VARIANT), "?")
        raise ConversionError(
            f"checkpoint holds a {variant} detector; --to {target} needs {module.VARIANT} "
            f"(use --to {expected})"
        )
    state, kind = _detector_state(ckpt)
    try:
        rules = module.rules(config, kind, keep_class_embed)
        return apply_keymap(state, rules)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc


def wrap_upstream(state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{"model": state_dict}``: the file layout the upstream repositories load."""
    return {"model": state_dict}


def to_internal(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse renaming: an upstream-layout state dict -> our ``Detector`` key names
    (``backbone.0.body.*`` -> ``backbone.body.*``; everything else is identical)."""
    return upstream_to_internal(state_dict)
