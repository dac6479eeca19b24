"""Key map to Atten4Vis/ConditionalDETR.

Conditional DETR's extra parameters (``transformer.decoder.query_scale``,
``transformer.decoder.ref_point_head``, ``transformer.decoder.layers.{l}.ca_qpos_proj`` ...)
live under ``transformer.`` with upstream names already, so the map equals DETR's.
"""

from __future__ import annotations

from siamese_detr.convert import detr
from siamese_detr.convert.keymap import Rule

TARGET = "conditional-detr"
VARIANT = "conditional"


def rules(config: dict, kind: str, keep_class_embed: bool | None = None) -> list[Rule]:
    """Rules for a Conditional-DETR checkpoint (same layout as DETR)."""
    return detr.rules(config, kind, keep_class_embed)
