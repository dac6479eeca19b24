"""siamese-detr: self-supervised pretraining and fine-tuning of DETR-family detectors."""

__version__ = "0.1.0"
