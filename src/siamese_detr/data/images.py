"""One image decoder: :func:`load_rgb` turns an image file into an upright 8-bit RGB picture.

Minimal version written for ``siamese-detr predict`` (the reliability branch extends this
module with the same signature): EXIF orientation applied (``ImageOps.exif_transpose``),
16/32-bit grayscale rescaled to 0..255 (PIL's own conversion would clip it), palette and alpha
images composited over white, CMYK and the other modes through PIL's conversion.
``IMAGE_ERRORS`` is what decoding a bad file raises (zero-byte, truncated, not an image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_ERRORS", "load_rgb", "to_uint8_rgb"]

IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _array_to_image(array: np.ndarray) -> Image.Image:
    """``HxW`` / ``HxWxC`` (C = 1, 3, 4: the fourth is alpha) uint8, uint16 or float in [0, 1]
    -> an 8-bit PIL image."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be HxW or HxWxC with C in (1, 3, 4), got shape "
                         f"{a.shape}")
    if a.dtype == np.uint16:
        a = np.rint(a.astype(np.float64) / 257.0)
    elif a.dtype.kind == "f":
        a = np.rint(np.nan_to_num(a.astype(np.float64)) * 255.0)
    elif a.dtype == np.bool_:
        a = a.astype(np.float64) * 255.0
    elif a.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8, uint16, bool or float, got {a.dtype}")
    a = np.ascontiguousarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray(a)  # L, RGB or RGBA from the shape


def to_uint8_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Any PIL image (or a HxW / HxWxC array: uint8; uint16 scaled by 1/257; float in [0, 1]
    scaled by 255; one channel repeated; a fourth channel taken as alpha) as 8-bit RGB."""
    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
        data = np.asarray(image).astype(np.float64)
        top = float(data.max(initial=0.0))
        scale = 255.0 if 0.0 < top <= 1.0 else (1.0 if top <= 255.0 else
                                                 255.0 / (65535.0 if top <= 65535 else top))
        gray = np.clip(np.rint(data * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                     rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` into an upright 8-bit RGB PIL image (fully loaded, file closed).

    Raises one of :data:`IMAGE_ERRORS` for a missing, empty, truncated or non-image file.
    """
    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return to_uint8_rgb(upright if upright is not None else image).copy()
