"""Key map to fundamentalvision/Deformable-DETR.

Upstream Deformable DETR keeps one class/box head per decoder layer (``class_embed.{l}``,
``bbox_embed.{l}``; the same module repeated when box refinement is off) and stores
``query_embed`` as ``[Q, 2D]`` = (positional half, content half). Our detector uses the same
layout, so ``query_embed`` is copied unchanged. Should a state dict carry a single,
un-indexed head (``bbox_embed.layers.0.weight``) it is replicated to every decoder layer, the
layer count read from the stored config (``model.dec_layers``).
"""

from __future__ import annotations

from torch import Tensor

from siamese_detr.convert import detr
from siamese_detr.convert.keymap import Rule, Transform

TARGET = "deformable-detr"
VARIANT = "deformable"


def per_layer(name: str, num_layers: int) -> Transform:
    """Transform for ``<name>.*`` keys: indexed keys (``<name>.{l}.*``) are kept when
    ``l < num_layers``; un-indexed ones are replicated to ``<name>.{0..num_layers-1}.*``."""

    def transform(key: str, value: Tensor) -> list[tuple[str, Tensor]]:
        rest = key[len(name) + 1 :]
        head, _, tail = rest.partition(".")
        if head.isdigit():
            if int(head) >= num_layers:
                raise ValueError(
                    f"{key!r}: layer {head} but the stored config has {num_layers} decoder layers"
                )
            return [(key, value)]
        return [(f"{name}.{layer}.{rest}", value.clone()) for layer in range(num_layers)]

    return transform


def num_decoder_layers(config: dict) -> int:
    """``model.dec_layers`` of the stored config (ValueError when absent)."""
    try:
        return int(config["model"]["dec_layers"])
    except (KeyError, TypeError) as exc:
        raise ValueError("checkpoint config lacks model.dec_layers") from exc


def rules(config: dict, kind: str, keep_class_embed: bool | None = None) -> list[Rule]:
    """Rules for a Deformable-DETR checkpoint; the head count comes from ``config``."""
    n = num_decoder_layers(config)
    cls_rule = detr.class_embed_rule(kind, keep_class_embed)
    if not cls_rule.drop:
        cls_rule = Rule("class_embed.", transform=per_layer("class_embed", n))
    return [
        *detr.shared_rules(kind, keep_class_embed),
        Rule("bbox_embed.", transform=per_layer("bbox_embed", n)),
        cls_rule,
    ]
