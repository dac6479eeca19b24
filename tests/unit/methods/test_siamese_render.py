"""``pretrain.siamese.view_resize_on=device``: workers send the outer view rectangle once, the
training device renders both views (``views.render_views``) within a level of PIL's resize."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from siamese_detr.config import SiameseOptions
from siamese_detr.engine.profiling import OpCounter
from siamese_detr.methods.siamese.data import collate_siamese, draw_views
from siamese_detr.methods.siamese.views import render_views, sample_views

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _scene(name: str) -> tuple[Image.Image, np.ndarray, SiameseOptions]:
    img = Image.fromarray(getattr(skimage_data, name)())
    w, h = img.size
    g = np.random.default_rng(len(name))
    xy = g.uniform(0, 0.6, (12, 2)) * (w, h)
    props = np.concatenate([xy, xy + g.uniform(0.1, 0.4, (12, 2)) * (w, h)], 1)
    opts = SiameseOptions(crop_size=32, augment_on="device")
    return img, props.astype(np.float32), opts


def _pair(name: str, seed: int):
    img, props, opts = _scene(name)
    pil = sample_views(img, props, replace(opts, view_resize_on="worker"),
                       np.random.default_rng(seed))
    dev = sample_views(img, props, opts, np.random.default_rng(seed))
    return pil, dev


@pytest.mark.parametrize("name", PHOTOS)
def test_rendered_views_within_a_level_of_pil(name: str) -> None:
    """Same random draws (boxes and colour parameters equal), and the rendered views differ
    from PIL's by at most 1 level, 0.15 on average, over 5 geometries per photo."""
    means = []
    for seed in range(5):
        pil, dev = _pair(name, seed)
        assert pil is not None and dev is not None and dev.deferred is not None
        assert dev.view1.numel() == 0 and dev.deferred.source is not None
        assert torch.equal(pil.boxes1, dev.boxes1) and torch.equal(pil.boxes2, dev.boxes2)
        assert torch.equal(pil.deferred.view_colour, dev.deferred.view_colour)
        assert torch.equal(pil.deferred.crop_colour, dev.deferred.crop_colour)
        done = dev.rendered()
        assert done.deferred is not None and done.deferred.source is None
        for a, b in ((pil.view1, done.view1), (pil.view2, done.view2)):
            assert a.shape == b.shape and b.dtype == torch.uint8
            diff = (a.int() - b.int()).abs()
            assert int(diff.max()) <= 1
            means.append(float(diff.float().mean()))
        # the worker sends one rectangle (with a 1-pixel margin), not two views
        assert dev.deferred.source.numel() < 0.7 * (pil.view1.numel() + pil.view2.numel())
    assert np.mean(means) < 0.3, means


def test_batch_render_equals_per_sample_render_with_zero_padding() -> None:
    """A collated batch of samples of different view sizes renders, in one call, what each
    sample renders alone (up to a level on a few pixels: the sampling grid is normalised by
    the padded source size, which moves positions by float32 rounding, 2e-5 of the pixels
    here); padding is zero and the mask is the one ``pad_images`` gives."""
    samples = [s for name in PHOTOS[:3] for s in (_pair(name, 7)[1], _pair(name, 8)[1])]
    assert len({tuple(s.deferred.view_size.tolist()) for s in samples}) > 1
    batch = collate_siamese(samples)
    assert batch.view1.images.shape[-2:] == (0, 0)  # not rendered yet
    with OpCounter() as counter:
        done = batch.rendered()
    assert counter.syncs == 0
    alone = collate_siamese([s.rendered() for s in samples])
    for k in (1, 2):
        got, want = getattr(done, f"view{k}"), getattr(alone, f"view{k}")
        diff = (got.images.int() - want.images.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
        assert int(got.images.masked_select(got.mask[:, None]).max()) == 0
        assert torch.equal(got.mask, want.mask) and torch.equal(got.sizes, want.sizes)
    assert done.deferred is not None and done.deferred.source is None
    assert torch.equal(done.deferred.view_colour, batch.deferred.view_colour)
    # what training reads, moved first: the batch's own rendering, finished
    views, crops = batch.to("cpu").joint_inputs()
    views_d, crops_d = done.joint_inputs()
    assert torch.equal(views.images, views_d.images) and torch.equal(crops, crops_d)


def test_render_views_hand_made() -> None:
    """A 2x upscale of a 2x2 source, by hand: PIL's centres at source positions -0.25, 0.25,
    0.75, 1.25 (clamped to 0 and 1 at the ends)."""
    src = torch.tensor([[0, 100], [200, 40]], dtype=torch.uint8).expand(1, 3, 2, 2)
    out = render_views(src, torch.tensor([[2, 2]]), torch.tensor([[[0.0, 0.0, 2.0, 2.0]]]),
                       torch.tensor([[4, 4]]), (5, 6))[0, 0, 0]
    top = [0, 25, 75, 100]
    bottom = [200, 160, 80, 40]
    row1 = [0.75 * t + 0.25 * b for t, b in zip(top, bottom)]
    row2 = [0.25 * t + 0.75 * b for t, b in zip(top, bottom)]
    want = torch.tensor([top, [round(v) for v in row1], [round(v) for v in row2], bottom])
    assert torch.equal(out[:4, :4].long(), want)
    assert int(out[4:].sum()) == 0 and int(out[:, 4:].sum()) == 0  # padding


def test_draw_views_renders_a_deferred_sample(tmp_path) -> None:
    pil, dev = _pair("coffee", 3)
    a = Image.open(draw_views(pil, tmp_path / "a.png"))
    b = Image.open(draw_views(dev, tmp_path / "b.png"))
    assert a.size == b.size
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1
