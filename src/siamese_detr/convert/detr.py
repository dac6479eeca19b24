"""Key map to facebookresearch/detr (vanilla DETR) and the rules shared by all targets.

Our detector already uses upstream parameter names except for the backbone, which upstream
wraps in a ``Joiner`` (``backbone.0`` = ResNet body, ``backbone.1`` = parameter-free sine
position encoding). Pretext-only modules are dropped with a reason.
"""

from __future__ import annotations

from siamese_detr.convert.keymap import Rule

TARGET = "detr"
VARIANT = "vanilla"

#: modules that exist only in pretext tasks (never loaded by a downstream detector)
PRETEXT_DROPS: tuple[tuple[str, str], ...] = (
    ("patch2query.", "pretext-only: region feature -> query projection"),
    ("feature_align.", "pretext-only: region-discrimination head"),
    ("projector.", "pretext-only: global-discrimination projector"),
    ("predictor.", "pretext-only: global-discrimination predictor"),
    ("feature_embed.", "pretext-only: DETReg object-embedding head"),
    ("criterion.", "loss buffer, not a model parameter"),
)

CLASS_EMBED_DROP = (
    "pretext 2-way class head (region / no-object) does not fit downstream classes; "
    "upstream fine-tuning deletes class_embed anyway"
)


def class_embed_rule(kind: str, keep_class_embed: bool | None) -> Rule:
    """Keep the class head of fine-tuned detectors, drop the pretext one by default."""
    keep = (kind != "pretrain") if keep_class_embed is None else keep_class_embed
    if keep:
        return Rule("class_embed.", "class_embed.")
    return Rule("class_embed.", drop=True, why=CLASS_EMBED_DROP)


def shared_rules(kind: str, keep_class_embed: bool | None) -> list[Rule]:
    """Rules common to DETR, Conditional DETR and Deformable DETR (except the heads that
    deformable replicates per layer)."""
    rules = [
        Rule("backbone.body.", "backbone.0.body."),
        Rule("input_proj.", "input_proj."),
        Rule("query_embed.", "query_embed."),
        Rule("transformer.", "transformer."),
    ]
    rules += [Rule(prefix, drop=True, why=why) for prefix, why in PRETEXT_DROPS]
    return rules


def rules(config: dict, kind: str, keep_class_embed: bool | None = None) -> list[Rule]:
    """Rules for a vanilla-DETR checkpoint (``config``: the stored ``RunConfig`` dict)."""
    return [
        *shared_rules(kind, keep_class_embed),
        Rule("bbox_embed.", "bbox_embed."),
        class_embed_rule(kind, keep_class_embed),
    ]
