"""Issue 9 "use": the Python API (``load_detector(...).predict``) and ``siamese-detr predict``
on a real photo, with a tiny fine-tuned checkpoint made here; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_detr.cli.main import main
from siamese_detr.configio import apply_overrides, to_dict
from siamese_detr.data.collate import pad_images
from siamese_detr.data.transforms import build_transforms
from siamese_detr.errors import UserError
from siamese_detr.eval.loading import load_detector
from siamese_detr.eval.postprocess import postprocess
from siamese_detr.models.detector import build_detector_from_config
from siamese_detr.presets import get_preset

from .conftest import finetune_overrides

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CATEGORIES = [{"id": 0, "name": "face"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "cup"}]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos (scikit-image) as files: 512x512 astronaut, 400x600 coffee."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("astronaut", "coffee"):
        out[name] = root / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(out[name])
    return out


@pytest.fixture(scope="module")
def finetuned(toy_data, tmp_path_factory) -> Path:
    """A conditional-DETR checkpoint fine-tuned for 2 iterations on the toy data."""
    out = tmp_path_factory.mktemp("ft")
    assert main(["finetune", *finetune_overrides(toy_data, out, iters=2)]) == 0
    return out / "last.pt"


def _set_weights_checkpoint(path: Path, variant: str, categories: bool = True,
                            kind: str = "finetune") -> Path:
    """A checkpoint (fine-tuning or pretraining) of a tiny detector with seeded random
    weights."""
    preset = "siamese" if kind == "pretrain" else "finetune"
    cfg = apply_overrides(get_preset(f"tiny/{variant}/{preset}"), ["data.val_size=128"])
    torch.manual_seed(0)
    detector = build_detector_from_config(cfg)
    payload = {"kind": kind, "step": 1, "config": to_dict(cfg),
               "model": {f"detector.{k}": v for k, v in detector.state_dict().items()}}
    if categories:
        payload["categories"] = CATEGORIES
    torch.save(payload, path)
    return path


def test_finetuning_stores_category_names(finetuned):
    ckpt = torch.load(finetuned, weights_only=True)
    assert ckpt["categories"] == CATEGORIES
    assert load_detector(finetuned, "cpu").categories == {0: "face", 1: "cat", 2: "cup"}


@pytest.mark.parametrize("variant", ["vanilla", "conditional", "deformable"])
def test_predict_equals_detector_after_postprocessing(tmp_path, photos, variant):
    """The API's numbers are the Detector's outputs post-processed (clipped), batch of two
    differently sized photos; boxes inside each image."""
    det = load_detector(_set_weights_checkpoint(tmp_path / "c.pt", variant), "cpu")
    pics = [Image.open(photos["astronaut"]).convert("RGB"),
            Image.open(photos["coffee"]).convert("RGB")]
    found = det.predict([photos["astronaut"], photos["coffee"]], score_threshold=0.0,
                        batch_size=2)
    transform = build_transforms(det.config.data, train=False)
    batch = pad_images([transform(p, {})[0] for p in pics])
    with torch.no_grad():
        out = det.detector(batch)
    orig = torch.tensor([[p.height, p.width] for p in pics])
    ref = postprocess(out.logits[-1], out.boxes[-1], orig, det.detector.head_activation, 100)
    for p, d, r in zip(pics, found, ref):
        limit = torch.tensor([p.width, p.height, p.width, p.height], dtype=torch.float32)
        clipped = torch.minimum(r["boxes"].clamp(min=0), limit)
        assert d.image_size == (p.height, p.width)
        torch.testing.assert_close(d.boxes, clipped, rtol=0, atol=1e-4)
        torch.testing.assert_close(d.scores, r["scores"], rtol=0, atol=1e-6)
        assert torch.equal(d.labels, r["labels"])
        assert len(d) == len(r["scores"]) >= 20 and d.names[0] in {"face", "cat", "cup"}
        assert (d.boxes >= 0).all() and (d.boxes <= limit).all()
        assert (d.boxes[:, 2:] >= d.boxes[:, :2]).all()
        assert (d.scores[:-1] >= d.scores[1:]).all()


def test_four_input_types_give_identical_results(tmp_path, photos):
    det = load_detector(_set_weights_checkpoint(tmp_path / "c.pt", "conditional"), "cpu")
    array = np.array(Image.open(photos["astronaut"]).convert("RGB"))
    inputs = {
        "path": str(photos["astronaut"]),
        "pil": Image.open(photos["astronaut"]),
        "numpy": array,
        "tensor uint8": torch.from_numpy(array).permute(2, 0, 1).contiguous(),
        "tensor float": torch.from_numpy(array).permute(2, 0, 1).float() / 255.0,
    }
    results = {k: det.predict(v, score_threshold=0.0)[0] for k, v in inputs.items()}
    ref = results["path"]
    for name, d in results.items():
        assert torch.equal(d.boxes, ref.boxes), name
        assert torch.equal(d.scores, ref.scores), name
        assert torch.equal(d.labels, ref.labels) and d.names == ref.names, name
    # a list mixing types is a batch, one result per image, in order
    mixed = det.predict([inputs["numpy"], inputs["path"]], score_threshold=0.0, batch_size=1)
    assert len(mixed) == 2 and torch.equal(mixed[1].scores, ref.scores)
    # the threshold keeps exactly the detections scoring at least it
    cut = float(ref.scores[5])
    kept = det.predict(inputs["path"], score_threshold=cut)[0]
    assert len(kept) == int((ref.scores >= cut).sum()) >= 6


def test_names_fall_back_to_class_n(tmp_path, photos):
    det = load_detector(_set_weights_checkpoint(tmp_path / "c.pt", "conditional",
                                                categories=False), "cpu")
    d = det.predict(photos["astronaut"], score_threshold=0.0)[0]
    assert d.names == [f"class {v}" for v in d.labels.tolist()]


def test_predict_cli_on_a_photo(finetuned, photos, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.open(photos["coffee"]).save(folder / "coffee.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    missing = tmp_path / "nope.png"
    out = tmp_path / "out"
    rc = main(["predict", str(finetuned), str(photos["astronaut"]), str(folder), str(missing),
               "--out", str(out), "--threshold", "0.0", "--batch-size", "2", "--device", "cpu",
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0
    errors = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(errors) == 2
    assert any(str(missing) in e and "no such file" in e for e in errors)
    assert any("broken.jpg" in e and "cannot be read" in e for e in errors)
    assert "2 image(s)" in captured.out and "skipped 2 input(s)" in captured.out
    images = json.loads((out / "images.json").read_text())
    ids = {Path(im["file_name"]).name: im["id"] for im in images["images"]}
    assert set(ids) == {"astronaut.png", "coffee.jpg"}
    assert images["categories"] == CATEGORIES
    results = json.loads((out / "predictions.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in images["images"]}
    assert sizes[ids["astronaut.png"]] == (512, 512)
    for r in results:
        x, y, w, h = r["bbox"]
        W, H = sizes[r["image_id"]]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= W + 1e-3 and y + h <= H + 1e-3
    # the same numbers as the API (and hence as the Detector after post-processing)
    det = load_detector(finetuned, "cpu")
    api = det.predict(photos["astronaut"], score_threshold=0.0)[0].to_coco(
        ids["astronaut.png"])
    cli = [r for r in results if r["image_id"] == ids["astronaut.png"]]
    assert len(cli) == len(api) == 60  # tiny conditional: top 100 of 20 queries x 3 classes
    for a, c in zip(api, cli):
        assert a["category_id"] == c["category_id"]
        assert c["score"] == pytest.approx(a["score"], abs=1e-6)
        assert c["bbox"] == pytest.approx(a["bbox"], abs=1e-3)
    with Image.open(out / "astronaut.png") as png:
        assert png.format == "PNG" and png.width == 512 and png.height > 512  # legend band
    lines = [json.loads(s) for s in (out / "summary.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and sum("error" in s for s in lines) == 2
    done = [s for s in lines if "detections" in s]
    assert {s["picture"] for s in done} == {"astronaut.png", "coffee.png"}
    assert all(d["name"] in {"face", "cat", "cup"} for s in done for d in s["detections"])


def test_predict_cli_nothing_readable_is_an_error(finetuned, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    rc = main(["predict", str(finetuned), str(bad), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.png" in err and "could be read" in err


def test_pretraining_checkpoint_must_be_finetuned_first(tmp_path, photos, capsys):
    ckpt = FIXTURES / "legacy_pretrain_vanilla.pt"
    rc = main(["predict", str(ckpt), str(photos["astronaut"]), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "must be fine-tuned first" in err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "o").exists()
    rc = main(["evaluate", "--checkpoint", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "must be fine-tuned first" in err[0]
    # the API: a pretraining checkpoint loads (its pretext head) but does not predict
    pre = load_detector(_set_weights_checkpoint(tmp_path / "p.pt", "conditional",
                                                kind="pretrain"), "cpu")
    assert pre.kind == "pretrain" and not pre.can_detect
    with pytest.raises(UserError, match="must be fine-tuned first"):
        pre.predict(photos["astronaut"])


def test_safetensors_folder_predicts_the_same_with_names(tmp_path, photos):
    """``export --to safetensors`` folder -> load_detector -> predict: the .pt's detections
    and its category names."""
    pytest.importorskip("safetensors")
    ckpt = _set_weights_checkpoint(tmp_path / "c.pt", "deformable")
    assert main(["export", str(ckpt), "--to", "safetensors", "--out", str(tmp_path / "f")]) == 0
    a = load_detector(ckpt, "cpu").predict(photos["coffee"], score_threshold=0.0)[0]
    folder = load_detector(tmp_path / "f", "cpu")
    assert folder.categories == {0: "face", 1: "cat", 2: "cup"}
    b = folder.predict(photos["coffee"], score_threshold=0.0)[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    assert a.names == b.names and set(b.names) <= {"face", "cat", "cup"}
