"""One image decoder for the whole package: every image becomes 8-bit RGB the same way.

Proposals, pretraining, fine-tuning and prediction all call :func:`load_rgb`, so a box computed
on an image by one stage lands on the same pixels in the next. PIL's ``convert("RGB")`` alone
is wrong for several modes; this module handles them explicitly:

- 16-bit and 32-bit grayscale (``I;16*``, ``I``, ``F``): rescaled to 0..255 from the range
  the data can hold (16-bit: divide by 257), never clipped at 255 (PIL saturates: a 16-bit
  PNG became an almost white picture and gave one proposal instead of hundreds);
- palette (``P``, ``PA``) and any alpha channel (``RGBA``, ``LA``, ``La``, ``RGBa``):
  composited over a white background (transparent pixels have no colour of their own);
- CMYK, YCbCr, LAB, HSV, 1-bit and 8-bit grayscale: PIL's conversion to RGB;
- EXIF orientation: the picture is turned upright (``ImageOps.exif_transpose``), as a viewer
  shows it; :func:`load_rgb` can keep the stored orientation when an annotation file records
  the stored size (``expected_size``), because boxes were drawn on that.

``IMAGE_ERRORS`` is what decoding a bad file raises (zero-byte, truncated, not an image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_ERRORS", "load_rgb", "load_rgb_array", "to_uint8_rgb"]

IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
BACKGROUND = (255, 255, 255)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float single-channel image as 8-bit ``L``, scaled, not clipped."""
    data = np.asarray(image)
    if data.dtype.kind == "f":
        finite = np.nan_to_num(data.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(finite.max(initial=0.0))
        scale = 255.0 if float(finite.min(initial=0.0)) >= 0.0 and top <= 1.0 else (
            1.0 if top <= 255.0 else 255.0 / top)
        out = finite * scale
    else:
        data = data.astype(np.int64)
        if image.mode.startswith("I;16") or data.max(initial=0) > 255:
            # 16-bit range (a 16-bit PNG may be opened as "I"): 65535 -> 255
            top = 65535 if data.max(initial=0) <= 65535 else int(data.max())
            out = data * (255.0 / top)
        else:
            out = data.astype(np.float64)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def to_uint8_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Any PIL image (or a HxW / HxWxC array, uint8/uint16/float) as an 8-bit RGB PIL image.

    Arrays: ``uint16`` is scaled by 1/257, floats in [0, 1] by 255, one channel is repeated,
    a fourth channel is taken as alpha.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _array_to_image(array: np.ndarray) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint16:
        a = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
    elif a.dtype.kind == "f":
        finite = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
        a = np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        return Image.fromarray(a, mode="L")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(a), mode="RGB" if a.shape[2] == 3
                               else "RGBA")
    raise ValueError(f"not an image array: shape {tuple(a.shape)} (expected HxW, HxWx1, "
                     "HxWx3 or HxWx4)")


def load_rgb(path: str | Path, *, expected_size: tuple[int, int] | None = None
             ) -> Image.Image:
    """Decode ``path`` fully (truncated files raise one of ``IMAGE_ERRORS``) as an upright
    8-bit RGB image.

    Args:
        expected_size: ``(width, height)`` an annotation file records for this image; when the
            EXIF-turned size differs from it but the stored size matches, the stored
            orientation is kept (the boxes were drawn on it).
    """
    with Image.open(path) as im:
        im.load()
        upright = _exif_upright(im)
        if (expected_size is not None and upright.size != tuple(expected_size)
                and im.size == tuple(expected_size)):
            upright = im
        return to_uint8_rgb(upright if upright is not im else im.copy())


def _exif_upright(image: Image.Image) -> Image.Image:
    try:
        turned = ImageOps.exif_transpose(image)
    except IMAGE_ERRORS:  # a broken EXIF block: keep the stored orientation
        return image
    return image if turned is None else turned


def load_rgb_array(path: str | Path, **kwargs: Any) -> np.ndarray:
    """:func:`load_rgb` as a ``HxWx3`` uint8 array."""
    return np.asarray(load_rgb(path, **kwargs))
