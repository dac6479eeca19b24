"""Which of our model configurations the upstream repositories can actually use.

A converted file must load *and run* in the target repository. Some of our configurations
convert key by key but upstream cannot build a model that uses them:

* Deformable DETR with 2 feature levels: upstream takes C3-C5 from the backbone whenever
  ``num_feature_levels > 1`` and adds extra levels beyond three, so it builds 1 or >= 3
  ``input_proj`` entries (fundamentalvision/Deformable-DETR ``models/deformable_detr.py``
  lines 59-68); our 2-level model has two (C4, C5) with other input widths.
* Deformable DETR with a ResNet-18/34 backbone: upstream asserts
  ``name not in ('resnet18', 'resnet34'), "number of channels are hard coded"``
  (``models/backbone.py`` line 106).
* Conditional DETR with ``hidden_dim != 256``: the sine embedding of the reference points has
  128 channels per axis hard-coded (Atten4Vis/ConditionalDETR ``models/transformer.py``
  lines 37-38, ``gen_sineembed_for_position``), so the file loads but the forward fails.

DETR and Conditional DETR do build ResNet-18/34 backbones (``--backbone resnet18``,
``models/backbone.py`` line 92 in DETR, line 100 in Conditional DETR): those convert, with a
note naming the upstream arguments the file needs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["upstream_arguments", "upstream_blockers"]


def _model(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config.get("model") or {})


def upstream_blockers(config: dict[str, Any], target: str) -> list[str]:
    """Reasons why upstream ``target`` cannot use a converted file of this stored config
    (empty: it can)."""
    model = _model(config)
    depth = int((model.get("backbone") or {}).get("depth", 50))
    hidden = int(model.get("hidden_dim", 256))
    levels = int(model.get("num_feature_levels", 1))
    reasons = []
    if target == "deformable-detr":
        if levels == 2:
            reasons.append(
                "model.num_feature_levels=2: upstream Deformable DETR builds 1 or >= 3 levels "
                "(C3-C5 plus extra ones), so its input_proj has other shapes"
            )
        if depth in (18, 34):
            reasons.append(
                f"ResNet-{depth} backbone: upstream Deformable DETR refuses resnet18/34 "
                "(\"number of channels are hard coded\", models/backbone.py)"
            )
    if target == "conditional-detr" and hidden != 256:
        reasons.append(
            f"model.hidden_dim={hidden}: upstream Conditional DETR hard-codes 256 in its "
            "reference-point sine embedding (models/transformer.py), so it would load the "
            "file and fail in forward"
        )
    return reasons


def upstream_arguments(config: dict[str, Any], target: str) -> str:
    """The upstream ``main.py`` model arguments that rebuild this stored config."""
    model = _model(config)
    depth = int((model.get("backbone") or {}).get("depth", 50))
    args = [f"--backbone resnet{depth}"]
    for key, flag in (("hidden_dim", "hidden_dim"), ("nheads", "nheads"),
                      ("enc_layers", "enc_layers"), ("dec_layers", "dec_layers"),
                      ("dim_feedforward", "dim_feedforward"), ("num_queries", "num_queries")):
        if key in model:
            args.append(f"--{flag} {model[key]}")
    if target == "deformable-detr":
        args.append(f"--num_feature_levels {model.get('num_feature_levels', 4)}")
        if model.get("box_refine"):
            args.append("--with_box_refine")
    return " ".join(args)
