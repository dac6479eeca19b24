"""load_rgb / to_uint8_rgb: one decoding of every image mode into upright 8-bit RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from siamese_detr.data.images import IMAGE_ERRORS, load_rgb, to_uint8_rgb


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # white band on the left of the stored picture
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.mode == "RGB" and out.size == (20, 40)  # turned upright: width 20, height 40
    assert np.asarray(out)[:10].mean() > 200 and np.asarray(out)[-10:].mean() < 50


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    data = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "g16.png")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert out.shape == (1, 3, 3) and out[0, :, 0].tolist() == [0, 100, 255]


def test_palette_with_transparency_over_white_and_cmyk(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    assert np.asarray(load_rgb(tmp_path / "p.png"))[0].tolist() == [[255, 255, 255],
                                                                     [200, 0, 0]]
    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = np.asarray(load_rgb(tmp_path / "c.jpg"))[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60  # red


def test_arrays_of_every_dtype_give_the_same_pixels():
    rgb = np.array([[[0, 128, 255]]], dtype=np.uint8)
    for array in (rgb, rgb.astype(np.uint16) * 257, rgb / 255.0):
        assert np.asarray(to_uint8_rgb(array)).tolist() == rgb.tolist()
    assert np.asarray(to_uint8_rgb(np.full((1, 1), 7, np.uint8))).tolist() == [[[7, 7, 7]]]
    with pytest.raises(ValueError, match="HxW"):
        to_uint8_rgb(np.zeros((2, 2, 5), np.uint8))


def test_bad_files_raise_image_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    for name in ("empty.jpg", "text.png", "missing.png"):
        with pytest.raises(IMAGE_ERRORS):
            load_rgb(tmp_path / name)
