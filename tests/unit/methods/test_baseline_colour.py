"""UP-DETR patches and DETReg crops with ``augment_on=device``: the workers draw the same
colour parameters (the worker path is unchanged) and send uint8 un-coloured crops; colouring
them with those parameters gives the worker's crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD
from siamese_detr.methods.detreg.data import region_crops
from siamese_detr.methods.siamese.colour import (
    NUM_COLOUR_PARAMS,
    apply_colour_pil,
    colour_normalise,
)
from siamese_detr.methods.siamese.views import to_normalised_tensor
from siamese_detr.methods.updetr.data import crop_patches

skimage_data = pytest.importorskip("skimage.data")
BOXES = np.array([[10, 20, 90, 120], [100, 40, 220, 200], [0, 0, 256, 256]], dtype=np.float64)


def _levels(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


@pytest.mark.parametrize("crop", [region_crops, crop_patches])
def test_deferred_crops_reproduce_the_worker_crops(crop) -> None:
    image = Image.fromarray(skimage_data.astronaut()).resize((256, 256))
    for seed in range(3):
        worker, none = crop(image, BOXES, 32, np.random.default_rng(seed))
        raw, params = crop(image, BOXES, 32, np.random.default_rng(seed), defer_colour=True)
        assert none is None and worker.dtype == torch.float32
        assert raw.dtype == torch.uint8 and params.shape == (3, NUM_COLOUR_PARAMS)
        for w, r, p in zip(worker, raw, params):
            pil = Image.fromarray(r.permute(1, 2, 0).numpy())
            redone = to_normalised_tensor(apply_colour_pil(pil, p.double().numpy()))
            assert (_levels(redone) - _levels(w)).abs().max() <= 1.01
        device = colour_normalise(raw, params)  # the batched tensor pipeline
        diff = (_levels(device) - _levels(worker)).abs()
        assert device.shape == worker.shape and diff.mean() < 2.5, float(diff.mean())
