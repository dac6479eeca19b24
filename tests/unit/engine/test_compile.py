"""engine.compile: a compiled detector gives the eager outputs, for two image sizes, and keeps
its parameter names."""

from __future__ import annotations

import pytest
import torch

from siamese_detr.engine.compile import compile_transformers
from siamese_detr.losses.set_criterion import num_logits
from siamese_detr.models.detector import build_detector
from siamese_detr.presets import get_preset
from siamese_detr.structures import ImageBatch


def _images(h: int, w: int) -> ImageBatch:
    g = torch.Generator().manual_seed(h * w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, :, w - 16:] = True  # the second image is padded on the right
    return ImageBatch(torch.randn(2, 3, h, w, generator=g), mask, torch.tensor([[h, w]] * 2))


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: about a minute per variant
@pytest.mark.parametrize("variant", ["vanilla", "conditional", "deformable"])
def test_compiled_transformer_matches_eager(variant: str) -> None:
    cfg = get_preset(f"tiny/{variant}/finetune")
    torch.manual_seed(0)
    det = build_detector(cfg.model, num_logits(cfg.model, cfg.loss)).eval()
    keys = list(det.state_dict())
    sizes = [(96, 128), (128, 96)]
    with torch.no_grad():
        eager = [det(_images(*s)) for s in sizes]
        assert compile_transformers(det) == ["transformer.encoder", "transformer.decoder"]
        compiled = [det(_images(*s)) for s in sizes]
    assert list(det.state_dict()) == keys
    for a, b in zip(eager, compiled):
        assert (a.logits - b.logits).abs().max() < 1e-4
        assert (a.boxes - b.boxes).abs().max() < 1e-5
