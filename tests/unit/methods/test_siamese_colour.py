"""The colour pipeline of crops: the PIL form (workers) and the batched tensor form (training
device, ``crop_colour=device``) compute the same operations, and deferring the pipeline to the
device changes nothing else in a sample."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.config import SiameseOptions
from siamese_detr.engine.profiling import OpCounter
from siamese_detr.methods.siamese.colour import (
    NUM_COLOUR_PARAMS,
    apply_colour_pil,
    colour_augment,
    colour_augment_tensor,
    sample_colour_params,
)
from siamese_detr.methods.siamese.data import collate_siamese, colour_crops
from siamese_detr.methods.siamese.views import normalise_uint8, sample_views, to_uint8_tensor

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
    ref = torch.stack([_u8(apply_colour_pil(im, p)) for im, p in zip(imgs, params)]).float()
    x = torch.stack([_u8(im) for im in imgs]).float() / 255
    out = colour_augment_tensor(x, torch.tensor(np.stack(params), dtype=torch.float32)) * 255
    diff = (out - ref).abs()
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
    ref = torch.stack([_u8(apply_colour_pil(im, p)) for im, p in zip(imgs, params)]).float()
    x = torch.stack([_u8(im) for im in imgs]).float() / 255
    out = colour_augment_tensor(x, torch.tensor(np.stack(params), dtype=torch.float32)) * 255
    diff = (out - ref).abs()
    assert diff.mean() < 0.6, float(diff.mean())  # PIL's blur is a box-filter approximation
    assert diff.quantile(0.99) <= 4, float(diff.quantile(0.99))
    plain = [i for i, p in enumerate(params) if p[10] == 0]  # grayscale alone: exact up to 1
    assert diff[plain].max() <= 1


def test_whole_pipeline_matches_pil_in_distribution_of_errors() -> None:
    imgs = _photo_crops(48, seed=2)
    rng = np.random.default_rng(11)
    params = [sample_colour_params(rng) for _ in imgs]
    ref = torch.stack([_u8(apply_colour_pil(im, p)) for im, p in zip(imgs, params)]).float()
    x = torch.stack([_u8(im) for im in imgs]).float() / 255
    out = colour_augment_tensor(x, torch.tensor(np.stack(params), dtype=torch.float32)) * 255
    diff = (out - ref).abs()
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


def _scene() -> tuple[Image.Image, np.ndarray]:
    img = Image.fromarray(skimage_data.astronaut()).resize((200, 200))
    props = np.array([[20, 20, 120, 140], [60, 10, 190, 100], [10, 90, 150, 190],
                      [80, 80, 180, 180]], dtype=np.float32)
    return img, props


def test_deferred_sample_equals_worker_sample_once_coloured() -> None:
    """``crop_colour=device`` draws the same random numbers: views and boxes are identical,
    and colouring each un-coloured crop with its parameters in PIL gives the worker's crop."""
    img, props = _scene()
    opts = SiameseOptions(base_scales=(160,), base_max_size=200, crop_size=32, num_regions=4)
    for seed in range(5):
        worker = sample_views(img, props, replace(opts, crop_colour="worker"),
                              np.random.default_rng(seed))
        device = sample_views(img, props, replace(opts, crop_colour="device"),
                              np.random.default_rng(seed))
        assert worker is not None and device is not None
        assert worker.crop_colour1 is None and device.crop_colour1 is not None
        for a, b in [(worker.view1, device.view1), (worker.view2, device.view2),
                     (worker.boxes1, device.boxes1), (worker.boxes2, device.boxes2)]:
            assert torch.equal(a, b)
        for crops_w, crops_d, params in [(worker.crops1, device.crops1, device.crop_colour1),
                                         (worker.crops2, device.crops2, device.crop_colour2)]:
            assert params.shape == (4, NUM_COLOUR_PARAMS) and params.dtype == torch.float32
            for cw, cd, p in zip(crops_w, crops_d, params):
                pil = Image.fromarray(cd.permute(1, 2, 0).numpy())
                # the float32 parameters differ from the float64 draws by rounding only
                redone = to_uint8_tensor(apply_colour_pil(pil, p.double().numpy()))
                assert (redone.int() - cw.int()).abs().max() <= 1


def test_batch_colours_crops_on_its_device_without_host_reads() -> None:
    img, props = _scene()
    opts = SiameseOptions(base_scales=(160,), base_max_size=200, crop_size=32, num_regions=4,
                          crop_colour="device")
    samples = [sample_views(img, props, opts, np.random.default_rng(s)) for s in range(3)]
    batch = collate_siamese(samples)
    assert batch.crop_colour1 is not None and batch.crop_colour1.shape == (3, 4,
                                                                           NUM_COLOUR_PARAMS)
    with OpCounter() as counter:
        crops = batch.crops()
    assert counter.syncs == 0
    assert crops is not None and crops.shape == (6, 4, 3, 32, 32) and crops.dtype == torch.float32
    both = torch.cat([batch.crops1, batch.crops2])
    params = torch.cat([batch.crop_colour1, batch.crop_colour2])
    expected = colour_crops(both, params)
    assert torch.equal(crops, expected)
    # de-normalised, the crops are the tensor pipeline's 8-bit images
    x = both.reshape(-1, 3, 32, 32).float() / 255
    coloured = colour_augment_tensor(x, params.reshape(-1, NUM_COLOUR_PARAMS)).view(both.shape)
    ref = normalise_uint8(torch.round(coloured * 255).to(torch.uint8))
    assert torch.allclose(crops, ref, atol=1e-5)
    # normalised() (the per-direction path) gives the same crops, split by view
    norm = batch.normalised()
    assert norm.crop_colour1 is None
    assert torch.equal(torch.cat([norm.crops1, norm.crops2]), crops)


def test_worker_colour_batch_unchanged() -> None:
    img, props = _scene()
    opts = SiameseOptions(base_scales=(160,), base_max_size=200, crop_size=32, num_regions=4,
                          crop_colour="worker")
    batch = collate_siamese([sample_views(img, props, opts, np.random.default_rng(0))])
    assert batch.crop_colour1 is None
    crops = batch.crops()
    assert crops is not None
    assert torch.equal(crops, normalise_uint8(torch.cat([batch.crops1, batch.crops2])))
