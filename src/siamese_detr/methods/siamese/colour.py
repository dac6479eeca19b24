"""The colour pipeline of views and region crops (method.md section 2.1), in two forms.

``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p = 0.8 (the four operations in a random order),
grayscale with p = 0.2, Gaussian blur with p = 0.5 and sigma ~ U(0.1, 2).

* :func:`colour_augment`: one PIL image, in the loader worker (the reference).
* :func:`colour_augment_tensor`: a batch of float images ``[N, 3, H, W]`` in ``[0, 1]``, each
  with its own parameters, vectorised (no per-image Python loop), on whatever device the
  batch is on. With ``augment_on=device`` (``pretrain.siamese``, ``pretrain.detreg``,
  ``pretrain.updetr``) the workers draw the parameters (:func:`sample_colour_params`, the
  same random draws in the same order as the PIL path) and send un-coloured images; the
  training device applies the pipeline to the whole batch at once. The two forms compute the
  same operations up to rounding (PIL rounds to 8 bits inside its HSV round trip and
  approximates the Gaussian blur with box filters); ``tests/unit/methods/
  test_siamese_colour.py`` bounds the difference.

Parameters of one image, a row of :data:`NUM_COLOUR_PARAMS`:
``[jitter_on, order_0..order_3, brightness, contrast, saturation, hue, grayscale_on, sigma]``
(``order_k``: which operation runs k-th, 0 brightness, 1 contrast, 2 saturation, 3 hue;
``sigma`` 0 means no blur).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter
from torch import Tensor

from siamese_detr.data.collate import padding_mask
from siamese_detr.structures import device_constant, imagenet_normalise

__all__ = ["NUM_COLOUR_PARAMS", "apply_colour_pil", "colour_augment", "colour_augment_tensor",
           "colour_normalise", "resolve_augment_on", "sample_colour_params"]

JITTER_P, JITTER_BCS, JITTER_HUE = 0.8, 0.4, 0.1
GRAYSCALE_P = 0.2
BLUR_P, BLUR_SIGMA = 0.5, (0.1, 2.0)
NUM_COLOUR_PARAMS = 11
_ORDER, _FACTORS, _HUE, _GRAY, _SIGMA = slice(1, 5), slice(5, 8), 8, 9, 10
_LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2)
_HUE_PHASES = (5.0, 3.0, 1.0)  # HSV -> RGB: where each of R, G, B sits on the hue circle
_BLUR_RADIUS = 6  # taps each side: 3 sigma at the largest sigma (2.0)


def sample_colour_params(rng: np.random.Generator) -> np.ndarray:
    """Draw one image's colour parameters (``[NUM_COLOUR_PARAMS]`` float64) from ``rng``."""
    p = np.zeros(NUM_COLOUR_PARAMS, dtype=np.float64)
    if rng.random() < JITTER_P:
        p[0] = 1.0
        p[_FACTORS] = [rng.uniform(1 - JITTER_BCS, 1 + JITTER_BCS) for _ in range(3)]
        p[_HUE] = rng.uniform(-JITTER_HUE, JITTER_HUE)
        p[_ORDER] = rng.permutation(4)
    else:
        p[_ORDER] = np.arange(4)
    if rng.random() < GRAYSCALE_P:
        p[_GRAY] = 1.0
    if rng.random() < BLUR_P:
        p[_SIGMA] = rng.uniform(*BLUR_SIGMA)
    return p


def apply_colour_pil(img: Image.Image, params: np.ndarray) -> Image.Image:
    """The pipeline on one PIL RGB image with the parameters of :func:`sample_colour_params`."""
    p = np.asarray(params, dtype=np.float64)
    if p[0]:
        brightness, contrast, saturation = (float(v) for v in p[_FACTORS])
        for op in p[_ORDER].astype(int):
            if op == 0:
                img = TF.adjust_brightness(img, brightness)
            elif op == 1:
                img = TF.adjust_contrast(img, contrast)
            elif op == 2:
                img = TF.adjust_saturation(img, saturation)
            else:
                img = TF.adjust_hue(img, float(p[_HUE]))
    if p[_GRAY]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p[_SIGMA] > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(p[_SIGMA])))
    return img


def colour_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The whole pipeline on one PIL RGB image, parameters drawn from ``rng``."""
    return apply_colour_pil(img, sample_colour_params(rng))


# ---------------------------------------------------------------- batched tensor form


def _gray(x: Tensor) -> Tensor:
    """``[N, 3, H, W] -> [N, 1, H, W]`` luma."""
    w = device_constant(_LUMA, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _quantise(x: Tensor) -> Tensor:
    """Round to the 8-bit levels, as PIL does after every operation."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def _hue_shift(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of ``x`` ``[n, 3, H, W]`` by ``shift`` ``[n]`` turns (HSV round trip)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    grey = chroma == 0
    safe = torch.where(grey, torch.ones_like(chroma), chroma)
    sat = torch.where(maxc > 0, chroma / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                      torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(grey, torch.zeros_like(h), h) / 6.0
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    # HSV -> RGB: each channel from the distance of h to its own phase
    k = torch.remainder(device_constant(_HUE_PHASES, x.device, x.dtype).view(1, 3, 1, 1)
                        + h.unsqueeze(1) * 6.0, 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return maxc.unsqueeze(1) * (1.0 - sat.unsqueeze(1) * ramp)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur, one sigma per image (edges replicated, as PIL extends them)."""
    n, c, H, W = x.shape
    r = _BLUR_RADIUS
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, 2r+1]
    z = x.reshape(1, n * c, H, W)
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
    z = F.conv2d(F.pad(z, (0, 0, r, r), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    return z.view(n, c, H, W)


def _extend_edges(x: Tensor, sizes: Tensor) -> Tensor:
    """Each image's last valid row and column copied over its padding (``sizes`` ``[N, 2]``
    ``(h, w)``), so that a blur near the padding sees PIL's edge extension, not zeros."""
    n, c, H, W = x.shape
    rows = torch.minimum(torch.arange(H, device=x.device)[None], sizes[:, :1] - 1)  # [N, H]
    cols = torch.minimum(torch.arange(W, device=x.device)[None], sizes[:, 1:] - 1)  # [N, W]
    x = x.gather(2, rows[:, None, :, None].expand(n, c, H, W))
    return x.gather(3, cols[:, None, None, :].expand(n, c, H, W))


def _select(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), new, old)


def _blend(x: Tensor, op: Tensor, a: Tensor, valid: Tensor | None, count: Tensor | None
           ) -> Tensor:
    """One blend operation per image: ``a * x + (1 - a) * d`` with ``d`` black (``op`` 0,
    brightness), the 8-bit mean luma (1, contrast; over the valid pixels) or the luma (2,
    saturation); ``a = 1`` leaves an 8-bit image exactly as it is."""
    gray = _gray(x)
    if valid is None:
        mean = gray.mean((1, 2, 3), keepdim=True)
    else:
        mean = (gray * valid).sum((1, 2, 3), keepdim=True) / count
    mean = torch.round(mean * 255.0) / 255.0
    op = op.view(-1, 1, 1, 1)
    degenerate = torch.where(op == 2, _quantise(gray), mean * (op == 1))
    a = a.view(-1, 1, 1, 1)
    return _quantise(a * x + (1 - a) * degenerate)


def colour_augment_tensor(x: Tensor, params: Tensor, sizes: Tensor | None = None) -> Tensor:
    """The pipeline on ``x`` ``[N, 3, H, W]`` float in ``[0, 1]``, image ``i`` with
    ``params[i]`` (``[N, NUM_COLOUR_PARAMS]``); returns float in ``[0, 1]``, rounded to 8-bit
    levels after each operation that ran (an 8-bit input with identity parameters comes back
    unchanged).

    ``sizes`` (``[N, 2]`` ``(h, w)``, optional): images padded at the bottom and right; the
    contrast mean is then taken over each image's valid pixels and the blur extends its
    edges, so the valid part equals the pipeline on the unpadded image (the padding holds
    junk: mask it afterwards).

    Vectorised over images with no host read. Each image's random order is three blend
    operations (brightness, contrast, saturation) with the hue rotation somewhere among them:
    ``k`` blends before it and ``3 - k`` after. So the batch runs three "before" blend slots,
    one hue rotation, three "after" blend slots; in each slot an image either applies its
    next blend or is left as it is (factor 1), then grayscale and blur."""
    if x.shape[0] == 0:
        return x
    p = params.to(device=x.device, dtype=torch.float32)
    x = x.float()
    on = p[:, 0] > 0
    order = p[:, _ORDER].round().long()
    f = p[:, _FACTORS]
    valid = count = None
    if sizes is not None:
        sizes = sizes.to(x.device)
        H, W = x.shape[-2:]
        valid = (~padding_mask(sizes, (H, W)))[:, None].to(x.dtype)  # [N, 1, H, W]
        count = sizes.prod(1).to(x.dtype).view(-1, 1, 1, 1)
    k = (order == 3).long().argmax(1)  # blends before the hue rotation
    slots = torch.arange(3, device=x.device)[None]  # [1, 3]
    blends = order.gather(1, slots + (slots >= k[:, None]).long())  # the order without hue
    factors = f.gather(1, blends)  # [N, 3]
    one = torch.ones_like(factors)
    before = torch.where(on[:, None] & (slots < k[:, None]), factors, one)
    after = torch.where(on[:, None] & (slots >= k[:, None]), factors, one)
    for j in range(3):
        x = _blend(x, blends[:, j], before[:, j], valid, count)
    x = _select(on, _quantise(_hue_shift(x, p[:, _HUE])), x)
    for j in range(3):
        x = _blend(x, blends[:, j], after[:, j], valid, count)
    x = _select(p[:, _GRAY] > 0, _quantise(_gray(x)).expand(-1, 3, -1, -1), x)
    sigma = p[:, _SIGMA]
    src = x if sizes is None else _extend_edges(x, sizes)
    blurred = _quantise(_blur(src, sigma.clamp(min=BLUR_SIGMA[0])))
    return _select(sigma > 0, blurred, x)


def colour_normalise(x: Tensor, params: Tensor) -> Tensor:
    """Crops ``[..., 3, h, w]`` (uint8, or float in ``[0, 1]``) and their parameters
    ``[..., NUM_COLOUR_PARAMS]`` -> coloured, ImageNet-normalised float32 of the same shape,
    on ``x``'s device (the deferred crop pipeline of ``augment_on=device``)."""
    shape = x.shape
    x = x.reshape(-1, *shape[-3:])
    x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
    x = colour_augment_tensor(x, params.reshape(-1, params.shape[-1]))
    return imagenet_normalise(x).view(shape)


def resolve_augment_on(setting: str, engine_device: str) -> str:
    """``augment_on`` of a pretraining method (``auto``, ``worker``, ``device``) -> ``worker``
    or ``device``: whether the workers leave the colour pipelines to the training device
    (``auto``: on a GPU)."""
    if setting == "auto":
        return "device" if engine_device != "cpu" and torch.cuda.is_available() else "worker"
    return setting
