"""Batched per-image colour pipeline of the Siamese views against torchvision per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from siamese_detr.methods.siamese import views as V


def _images(n: int = 5, h: int = 20, w: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_op_equals_torchvision_per_image(op):
    img = _images()
    f = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4]) if op != "hue" else torch.tensor(
        [-0.1, -0.05, 0.0, 0.05, 0.1])
    got = {
        "brightness": lambda: V._blend(img, torch.zeros_like(img), f),
        "contrast": lambda: V._blend(img, V._gray(img).mean((1, 2, 3), keepdim=True), f),
        "saturation": lambda: V._blend(img, V._gray(img), f),
        "hue": lambda: V._shift_hue(img, f),
    }[op]()
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
          "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[op]
    for i in range(len(img)):
        torch.testing.assert_close(got[i], fn(img[i], float(f[i])), atol=1e-5, rtol=1e-5)


def test_blur_equals_torchvision_gaussian_blur_per_sigma():
    img = _images()
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    got = V._gaussian_blur(img, sigma)
    for i in range(len(img)):
        ref = TF.gaussian_blur(img[i], [13, 13], [float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


def test_pipeline_is_per_image_and_deterministic():
    img = _images(n=64)
    a = V.colour_augment_batch(img, np.random.default_rng(1))
    assert torch.equal(a, V.colour_augment_batch(img, np.random.default_rng(1)))
    assert a.min() >= 0 and a.max() <= 1
    unchanged = [torch.allclose(a[i], img[i]) for i in range(len(img))]
    assert 0 < sum(unchanged) < 20  # untouched with p = 0.2 * 0.8 * 0.5 = 8 %
