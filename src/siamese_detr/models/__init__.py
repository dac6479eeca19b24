"""Detector models: backbone, transformers (vanilla, conditional, deformable), Detector."""

from siamese_detr.models.backbone import Backbone, load_backbone_weights
from siamese_detr.models.detector import Detector, build_detector

__all__ = ["Backbone", "Detector", "build_detector", "load_backbone_weights"]
