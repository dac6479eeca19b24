"""The colour pipeline and region crops: the PIL form (workers) and the batched tensor form
(training device, ``augment_on=device``) compute the same operations, and deferring them to
the device changes nothing else in a sample."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.config import SiameseOptions
from siamese_detr.constants import IMAGENET_MEAN, IMAGENET_STD
from siamese_detr.engine.profiling import OpCounter
from siamese_detr.methods.siamese.colour import (
    NUM_COLOUR_PARAMS,
    apply_colour_pil,
    colour_augment,
    colour_augment_tensor,
    sample_colour_params,
)
from siamese_detr.methods.siamese.data import collate_siamese, cut_crops
from siamese_detr.methods.siamese.views import normalise_uint8, sample_views

skimage_data = pytest.importorskip("skimage.data")


def _photo_crops(n: int, size: int = 96, seed: int = 0) -> list[Image.Image]:
    """Crops of real photos (noise would exaggerate the blur's approximation)."""
    rng = np.random.default_rng(seed)
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    out = []
    for i in range(n):
        a = photos[i % len(photos)]
        y, x = rng.integers(0, a.shape[0] - size), rng.integers(0, a.shape[1] - size)
        out.append(Image.fromarray(np.ascontiguousarray(a[y:y + size, x:x + size])))
    return out


def _u8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _diff_to_pil(imgs: list[Image.Image], params: list[np.ndarray]) -> torch.Tensor:
    """``|tensor pipeline - PIL pipeline|`` in 8-bit levels, ``[N, 3, H, W]``."""
    ref = torch.stack([_u8(apply_colour_pil(im, p)) for im, p in zip(imgs, params)]).float()
    x = torch.stack([_u8(im) for im in imgs]).float() / 255
    out = colour_augment_tensor(x, torch.tensor(np.stack(params), dtype=torch.float32)) * 255
    return (out - ref).abs()


def _identity() -> np.ndarray:
    p = np.zeros(NUM_COLOUR_PARAMS)
    p[1:5] = np.arange(4)
    return p


def _one_op(op: int, value: float) -> np.ndarray:
    """Jitter on with only operation ``op`` away from identity, run first."""
    p = _identity()
    p[0] = 1.0
    p[1:5] = [op] + [k for k in range(4) if k != op]
    p[5:8] = 1.0
    if op < 3:
        p[5 + op] = value
    else:
        p[8] = value
    return p


def test_parameters_are_the_draws_of_the_pipeline_in_order() -> None:
    """The draw order of the PIL pipeline is kept: jitter coin, 3 factors, hue, order,
    grayscale coin, blur coin, sigma (so worker-side samples are unchanged)."""
    seed = 7
    for trial in range(40):
        rng = np.random.default_rng([seed, trial])
        p = sample_colour_params(rng)
        ref = np.random.default_rng([seed, trial])
        expected = _identity()
        if ref.random() < 0.8:
            expected[0] = 1.0
            expected[5:8] = [ref.uniform(0.6, 1.4) for _ in range(3)]
            expected[8] = ref.uniform(-0.1, 0.1)
            expected[1:5] = ref.permutation(4)
        if ref.random() < 0.2:
            expected[9] = 1.0
        if ref.random() < 0.5:
            expected[10] = ref.uniform(0.1, 2.0)
        np.testing.assert_array_equal(p, expected)
        assert rng.random() == ref.random()  # the same number of draws


def test_colour_augment_is_parameters_then_apply() -> None:
    img = _photo_crops(1)[0]
    for trial in range(10):
        a = colour_augment(img, np.random.default_rng(trial))
        b = apply_colour_pil(img, sample_colour_params(np.random.default_rng(trial)))
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize(("op", "low", "high"), [(0, 0.6, 1.4), (1, 0.6, 1.4), (2, 0.6, 1.4),
                                                 (3, -0.1, 0.1)])
def test_each_operation_matches_pil(op: int, low: float, high: float) -> None:
    """Brightness, contrast, saturation, hue: within a level or so of PIL (which rounds to 8
    bits inside its HSV round trip, even for a hue shift of 0)."""
    imgs = _photo_crops(24)
    values = np.random.default_rng(op).uniform(low, high, len(imgs))
    params = [_one_op(op, v) for v in values]
    diff = _diff_to_pil(imgs, params)
    assert diff.mean() < 1.0, float(diff.mean())
    assert diff.quantile(0.99) <= 5, float(diff.quantile(0.99))


def test_grayscale_and_blur_match_pil() -> None:
    imgs = _photo_crops(24, seed=1)
    rng = np.random.default_rng(3)
    params = []
    for i in range(len(imgs)):
        p = _identity()
        p[9] = float(i % 2)
        p[10] = rng.uniform(0.1, 2.0) if i % 3 else 0.0
        params.append(p)
    diff = _diff_to_pil(imgs, params)
    assert diff.mean() < 0.6, float(diff.mean())  # PIL's blur is a box-filter approximation
    assert diff.quantile(0.99) <= 4, float(diff.quantile(0.99))
    plain = [i for i, p in enumerate(params) if p[10] == 0]  # grayscale alone: exact up to 1
    assert diff[plain].max() <= 1


def test_whole_pipeline_matches_pil_in_distribution_of_errors() -> None:
    imgs = _photo_crops(48, seed=2)
    rng = np.random.default_rng(11)
    params = [sample_colour_params(rng) for _ in imgs]
    diff = _diff_to_pil(imgs, params)
    assert diff.mean() < 2.0, float(diff.mean())
    assert diff.quantile(0.99) <= 10, float(diff.quantile(0.99))


def test_identity_parameters_and_rows_independent() -> None:
    x = torch.randint(0, 256, (6, 3, 20, 24), generator=torch.Generator().manual_seed(0)) / 255
    ident = torch.tensor(np.stack([_identity()] * 6), dtype=torch.float32)
    assert torch.equal(colour_augment_tensor(x, ident), x)
    rng = np.random.default_rng(5)
    params = torch.tensor(np.stack([sample_colour_params(rng) for _ in range(6)]),
                          dtype=torch.float32)
    whole = colour_augment_tensor(x, params)
    for i in range(6):  # vectorised over images: each row as if alone
        alone = colour_augment_tensor(x[i:i + 1], params[i:i + 1])
        assert torch.allclose(whole[i:i + 1], alone, atol=1e-6)
    assert colour_augment_tensor(x[:0], params[:0]).shape == (0, 3, 20, 24)


def _scene() -> tuple[Image.Image, np.ndarray, SiameseOptions]:
    img = Image.fromarray(skimage_data.astronaut()).resize((300, 260))
    props = np.array([[20, 20, 120, 140], [60, 10, 190, 100], [10, 90, 150, 190],
                      [80, 80, 180, 180], [150, 120, 290, 250]], dtype=np.float32)
    opts = SiameseOptions(base_scales=(200, 240), base_max_size=320, crop_size=48,
                          num_regions=5)
    return img, props, opts


def _pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).numpy())


def _pil_crop(view: Image.Image, box: torch.Tensor, size: int) -> Image.Image:
    """The worker's crop of one box (clamped as ``views._region_crops`` does)."""
    W, H = view.size
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = min(max(x0, 0.0), W - 1.0), min(max(x1, 0.0), float(W))
    y0, y1 = min(max(y0, 0.0), H - 1.0), min(max(y1, 0.0), float(H))
    x1, y1 = max(x1, x0 + 1.0), max(y1, y0 + 1.0)
    return view.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))


def test_deferred_sample_carries_the_worker_draws() -> None:
    """``augment_on=device`` draws the same random numbers: the boxes are identical, and the
    un-coloured views and crops, coloured in PIL with the parameters the sample carries, are
    the worker's views and crops (up to the float32 rounding of the parameters)."""
    img, props, opts = _scene()
    for seed in range(4):
        worker = sample_views(img, props, replace(opts, augment_on="worker"),
                              np.random.default_rng(seed))
        device = sample_views(img, props, replace(opts, augment_on="device",
                                                  view_resize_on="worker"),
                              np.random.default_rng(seed))
        assert worker is not None and device is not None
        assert worker.deferred is None and device.deferred is not None
        assert device.crops1 is None and device.crops2 is None
        d = device.deferred
        assert d.view_colour.shape == (2, NUM_COLOUR_PARAMS) and d.crop_size == 48
        assert d.crop_colour is not None and d.crop_colour.shape == (2, 5, NUM_COLOUR_PARAMS)
        assert torch.equal(worker.boxes1, device.boxes1)
        assert torch.equal(worker.boxes2, device.boxes2)
        views = [(worker.view1, device.view1, worker.crops1, device.boxes1),
                 (worker.view2, device.view2, worker.crops2, device.boxes2)]
        for k, (vw, vd, crops_w, boxes) in enumerate(views):
            redone = _u8(apply_colour_pil(_pil(vd), d.view_colour[k].double().numpy()))
            assert (redone.int() - vw.int()).abs().max() <= 1
            for j, box in enumerate(boxes):
                crop = _pil_crop(_pil(vd), box, 48)
                redone = _u8(apply_colour_pil(crop, d.crop_colour[k, j].double().numpy()))
                assert (redone.int() - crops_w[j].int()).abs().max() <= 1


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised float -> 8-bit levels."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def test_device_batch_matches_the_worker_batch() -> None:
    """The finished device batch against the worker batch of the same seeds: views and crops
    within a level or two on average (PIL rounds inside its HSV round trip, blurs with box
    filters and resizes with a triangle filter; the device path uses exact Gaussians and
    RoIAlign's box average), padding zero, boxes equal."""
    img, props, opts = _scene()
    seeds = range(10)
    bw = collate_siamese([sample_views(img, props, replace(opts, augment_on="worker"),
                                       np.random.default_rng(s)) for s in seeds]).normalised()
    bd = collate_siamese([sample_views(img, props, replace(opts, augment_on="device"),
                                       np.random.default_rng(s)) for s in seeds]).normalised()
    assert bd.deferred is None and bd.view1.images.dtype == torch.float32
    for k in (1, 2):
        vw, vd = getattr(bw, f"view{k}"), getattr(bd, f"view{k}")
        assert torch.equal(vw.mask, vd.mask)
        assert float(vd.images.masked_select(vd.mask[:, None]).abs().max()) == 0.0
        valid = ~vw.mask[:, None].expand_as(vw.images)
        diff = (_levels(vw.images) - _levels(vd.images)).abs()[valid]
        assert diff.mean() < 2.0, float(diff.mean())
        assert diff.quantile(0.99) <= 10, float(diff.quantile(0.99))
        cw, cd = getattr(bw, f"crops{k}"), getattr(bd, f"crops{k}")
        assert cw.shape == cd.shape == (10, 5, 3, 48, 48)
        diff = (_levels(cw) - _levels(cd)).abs().flatten()
        assert diff.mean() < 2.5, float(diff.mean())
        assert diff.quantile(0.99) <= 14, float(diff.quantile(0.99))


def test_cut_crops_matches_pil_resize() -> None:
    img, props, _ = _scene()
    view = _u8(img)[None].float() / 255
    boxes = torch.tensor(props)[None]
    crops = cut_crops(view, boxes, torch.tensor([[img.height, img.width]]), 48)[0]
    ref = torch.stack([_u8(_pil_crop(img, b, 48)) for b in boxes[0]]).float()
    diff = (crops * 255 - ref).abs().flatten()
    assert diff.mean() < 2.5, float(diff.mean())
    assert diff.quantile(0.99) <= 14, float(diff.quantile(0.99))
    # the clamp: a box beyond the image is cut at the image's edge, at least one pixel wide
    out = cut_crops(view, torch.tensor([[[-50.0, -50.0, 40.0, 40.0]]]),
                    torch.tensor([[img.height, img.width]]), 8)
    inside = cut_crops(view, torch.tensor([[[0.0, 0.0, 40.0, 40.0]]]),
                       torch.tensor([[img.height, img.width]]), 8)
    assert torch.equal(out, inside)


def test_padded_images_colour_as_if_unpadded() -> None:
    """With ``sizes``, the contrast mean and the blur ignore the padding: the valid part of a
    padded image equals the pipeline on the image alone."""
    imgs = _photo_crops(6, size=64, seed=4)
    rng = np.random.default_rng(9)
    params = []
    for _ in range(6):  # contrast first and a blur on every image
        p = _one_op(1, rng.uniform(0.6, 1.4))
        p[10] = rng.uniform(0.5, 2.0)
        params.append(p)
    params_t = torch.tensor(np.stack(params), dtype=torch.float32)
    sizes = torch.tensor([[64 - 8 * (i % 3), 64 - 5 * i] for i in range(6)])
    padded = torch.zeros(6, 3, 64, 64)
    for i, im in enumerate(imgs):
        h, w = sizes[i].tolist()
        padded[i, :, :h, :w] = _u8(im)[:, :h, :w].float() / 255
    out = colour_augment_tensor(padded, params_t, sizes=sizes)
    for i in range(6):
        h, w = sizes[i].tolist()
        alone = colour_augment_tensor(padded[i:i + 1, :, :h, :w], params_t[i:i + 1])
        assert torch.allclose(out[i:i + 1, :, :h, :w], alone, atol=1e-6)


def test_joint_inputs_finish_on_the_device_without_host_reads() -> None:
    img, props, opts = _scene()
    opts = replace(opts, augment_on="device")
    batch = collate_siamese([sample_views(img, props, opts, np.random.default_rng(s))
                             for s in range(3)])
    assert batch.deferred is not None and batch.deferred.view_colour.shape == (3, 2,
                                                                              NUM_COLOUR_PARAMS)
    with OpCounter() as counter:
        views, crops = batch.joint_inputs()
    assert counter.syncs == 0
    assert views.images.shape[0] == 6 and views.images.dtype == torch.float32
    assert crops is not None and crops.shape == (6, 5, 3, 48, 48)
    norm = batch.normalised()  # the per-view path gives the same tensors
    assert torch.equal(views.images, torch.cat([norm.view1.images, norm.view2.images]))
    assert torch.equal(crops, torch.cat([norm.crops1, norm.crops2]))
    views2, none = batch.joint_inputs(crops=False)
    assert none is None and torch.equal(views2.images, views.images)
    # pinned and moved, the parameters travel with the batch
    moved = batch.to("cpu")
    assert moved.deferred is not None
    assert torch.equal(moved.deferred.view_colour, batch.deferred.view_colour)


def test_worker_batch_unchanged() -> None:
    img, props, opts = _scene()
    opts = replace(opts, augment_on="worker")
    batch = collate_siamese([sample_views(img, props, opts, np.random.default_rng(0))])
    assert batch.deferred is None
    views, crops = batch.joint_inputs()
    assert crops is not None
    assert torch.equal(crops, normalise_uint8(torch.cat([batch.crops1, batch.crops2])))
    expected = normalise_uint8(torch.cat([batch.view1.images, batch.view2.images]))
    assert torch.equal(views.images, expected.masked_fill(views.mask[:, None], 0.0))
