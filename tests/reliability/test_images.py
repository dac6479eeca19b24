"""Item 7: every stage decodes images through one function (16-bit, palette, alpha, CMYK,
grayscale, EXIF orientation)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _texture(h: int = 48, w: int = 64) -> np.ndarray:
    """A picture with edges: bright squares on a mid-grey ramp (8-bit)."""
    y, x = np.mgrid[0:h, 0:w]
    img = (60 + x * 2).astype(np.uint8)
    img[8:20, 8:24] = 230
    img[28:44, 36:60] = 15
    return img


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    from siamese_detr.proposals.generate import load_rgb as proposals_load

    gray8 = _texture()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    decoded = proposals_load(tmp_path / "g16.png")  # what proposal generation sees
    assert decoded.dtype == np.uint8 and decoded.shape == (48, 64, 3)
    np.testing.assert_array_equal(decoded[..., 0], gray8)
    np.testing.assert_array_equal(decoded[..., 2], gray8)


def test_16bit_png_gives_the_8bit_proposals(tmp_path):
    from siamese_detr.data.sources import ImageRecord
    from siamese_detr.proposals.generate import ProposalSettings, process_record

    gray8 = _texture(96, 128)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    settings = ProposalSettings(method="selective-search", max_boxes=64)
    p8, _ = process_record(ImageRecord("a", tmp_path / "g8.png"), settings)
    p16, _ = process_record(ImageRecord("a", tmp_path / "g16.png"), settings)
    assert p8 is not None and p16 is not None
    assert len(p8.boxes) > 1
    np.testing.assert_array_equal(p16.boxes, p8.boxes)


def test_palette_with_transparency_and_alpha_go_over_white(tmp_path):
    from siamese_detr.data.images import load_rgb

    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> background, not black
    assert out[0, 1].tolist() == [200, 10, 10]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 100
    rgba[..., 3] = [[0, 255], [128, 255]]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [100, 0, 0]
    assert out[1, 0].tolist() == pytest.approx([178, 127, 127], abs=1)


def test_cmyk_grayscale_and_one_bit(tmp_path):
    from siamese_detr.data.images import load_rgb

    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert np.asarray(load_rgb(tmp_path / "c.jpg"))[1, 1].tolist() == pytest.approx(
        [255, 0, 0], abs=3)
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert np.asarray(load_rgb(tmp_path / "l.png"))[0, 0].tolist() == [77, 77, 77]
    Image.new("1", (3, 3), 1).save(tmp_path / "b.png")
    assert np.asarray(load_rgb(tmp_path / "b.png"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied_unless_the_annotation_says_stored_size(tmp_path):
    from siamese_detr.data.images import load_rgb

    stored = np.zeros((2, 4, 3), np.uint8)  # 4 wide, 2 high; top-left pixel red
    stored[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    upright = load_rgb(tmp_path / "r.png")
    assert upright.size == (2, 4)
    assert np.asarray(upright)[0, 1].tolist() == [255, 0, 0]  # top-left went to top-right
    kept = load_rgb(tmp_path / "r.png", expected_size=(4, 2))
    assert kept.size == (4, 2) and np.asarray(kept)[0, 0].tolist() == [255, 0, 0]


def test_every_stage_uses_the_one_decoder(tmp_path, monkeypatch):
    """Pretraining and fine-tuning decode a 16-bit PNG like proposals do."""
    import json

    from siamese_detr.data.coco import CocoDetection
    from siamese_detr.methods.siamese.data import PretrainDataset

    gray8 = _texture()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    ann = {"images": [{"id": 1, "file_name": "g16.png", "width": 64, "height": 48}],
           "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "a.json").write_text(json.dumps(ann))
    coco = CocoDetection(tmp_path, tmp_path / "a.json")
    np.testing.assert_array_equal(np.asarray(coco.load_image(0))[..., 1], gray8)

    class R:
        image_id = "g16"
        path = tmp_path / "g16.png"

    image = PretrainDataset._load_image(object.__new__(PretrainDataset), R())
    np.testing.assert_array_equal(np.asarray(image)[..., 1], gray8)


def test_to_uint8_rgb_arrays():
    from siamese_detr.data.images import to_uint8_rgb

    assert np.asarray(to_uint8_rgb(np.full((2, 2), 65535, np.uint16)))[0, 0].tolist() == [
        255, 255, 255]
    assert np.asarray(to_uint8_rgb(np.full((2, 2, 3), 0.5, np.float32)))[0, 0].tolist() == [
        128, 128, 128]
