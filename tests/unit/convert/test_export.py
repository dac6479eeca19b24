"""Export to transformers / ONNX / our safetensors folder, and import back (issue 9).

Tiny detectors with random, perturbed weights (frozen-BN statistics included) and a batch with
padding: the exported transformers model, the re-imported detector and the ONNX graph must
reproduce our outputs.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from siamese_detr.config import BackboneConfig, LossConfig, ModelConfig, RunConfig
from siamese_detr.configio import to_dict
from siamese_detr.convert.folder import is_folder, load_folder, save_folder
from siamese_detr.convert.hf import (
    HfError,
    from_hf_state,
    model_overrides,
    to_hf_state,
    unsupported_reason,
)
from siamese_detr.convert.source import build_from_source, read_source
from siamese_detr.structures import ImageBatch

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
              {"id": 3, "name": "triangle"}]
# name -> (variant, feature levels, box refinement)
CASES = {
    "vanilla": ("vanilla", 1, False),
    "conditional": ("conditional", 1, False),
    "deformable": ("deformable", 2, False),
    "deformable-refine": ("deformable", 4, True),
}
HF_TOL, ONNX_TOL = 1e-4, 1e-3


def _run_config(variant: str, levels: int = 1, refine: bool = False, depth: int = 18,
                cls_loss: str = "auto") -> RunConfig:
    model = ModelConfig(
        variant=variant, backbone=BackboneConfig(depth=depth), num_classes=4, hidden_dim=32,
        nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32, dropout=0.0, num_queries=5,
        num_feature_levels=levels, enc_n_points=2, dec_n_points=2, box_refine=refine)
    return RunConfig(name=f"tiny-{variant}", model=model, loss=LossConfig(cls_loss=cls_loss))


def _checkpoint(name: str, kind: str = "finetune") -> dict:
    """A checkpoint dict of case ``name`` with non-trivial weights (built once per case)."""
    ckpt = _built(name)[0]
    return {**ckpt, "config": copy.deepcopy(ckpt["config"]), "kind": kind}


@functools.cache
def _built(name: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``(checkpoint, last-layer logits, boxes on _batch())`` of case ``name``."""
    from siamese_detr.losses.set_criterion import num_logits
    from siamese_detr.models.detector import build_detector

    variant, levels, refine = CASES[name]
    cfg = _run_config(variant, levels, refine)
    torch.manual_seed(0)
    det = build_detector(cfg.model, num_logits(cfg.model, cfg.loss))
    with torch.no_grad():
        for p in det.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for key, buf in det.named_buffers():
            if key.endswith("running_var") or key.endswith("weight"):
                buf.uniform_(0.5, 1.5)
            elif key.endswith(("running_mean", "bias")):
                buf.normal_(0.0, 0.1)
    ckpt = {"model": det.state_dict(), "config": to_dict(cfg), "kind": "finetune", "step": 1,
            "categories": CATEGORIES}
    with torch.no_grad():
        out = det.eval()(_batch())
    return ckpt, out.logits[-1], out.boxes[-1]


def _batch() -> ImageBatch:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=g)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    mask[1, 48:, :] = True
    images[mask[:, None].expand_as(images)] = 0.0
    return ImageBatch(images=images, mask=mask, sizes=torch.tensor([[64, 96], [48, 64]]))


def _ours(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _built(name)[1:]


def read_source_dict(ckpt: dict) -> dict:
    return {"model": ckpt["model"], "config": ckpt["config"], "kind": ckpt["kind"],
            "categories": ckpt.get("categories", [])}


def _save(ckpt: dict, path: Path) -> Path:
    torch.save(ckpt, path)
    return path


# ----------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("name", [
    "vanilla", "conditional", "deformable",
    pytest.param("deformable-refine", marks=pytest.mark.slow),
])
def test_hf_export_loads_strictly_matches_and_imports_back(name, tmp_path, transformers):
    from siamese_detr.convert.hf import export_hf_dir

    ckpt = _checkpoint(name)
    logits, boxes = _ours(name)
    result = export_hf_dir(read_source(_save(ckpt, tmp_path / "c.pt")), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "N/A", "1": "circle", "2": "square", "3": "triangle"}
    cls = getattr(transformers, result.architecture)
    hf, info = cls.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing/unexpected/mismatched
    b = _batch()
    with torch.no_grad():
        out = hf.eval()(pixel_values=b.images, pixel_mask=(~b.mask).long())
    hf_err = max((out.logits - logits).abs().max(), (out.pred_boxes - boxes).abs().max())
    assert hf_err < HF_TOL
    # import the directory back (what `finetune --init DIR` reads)
    back = read_source(tmp_path / "hf")
    assert back["categories"] == CATEGORIES
    det, _ = build_from_source(back)
    with torch.no_grad():
        again = det(b)
    assert (again.logits[-1] - logits).abs().max() < HF_TOL
    assert (again.boxes[-1] - boxes).abs().max() < HF_TOL
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Licence" in card and "fine-tuning" in card
    proc = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert proc["size"] == {"shortest_edge": 800, "longest_edge": 1333}
    assert proc["image_mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_key_maps_invert_each_other_for_resnet50_and_timm_names() -> None:
    """to_hf_state then from_hf_state is the identity (ResNet-50 bottlenecks, shortcut
    convolutions); timm's backbone names (public checkpoints) read the same."""
    from siamese_detr.models.detector import build_detector

    cfg = _run_config("conditional", depth=50)
    state = build_detector(cfg.model, 4).state_dict()
    model = to_dict(cfg)["model"]
    hf = to_hf_state(state, model)
    assert "model.backbone.conv_encoder.model.encoder.stages.0.layers.0.shortcut.convolution" \
           ".weight" in hf
    assert "model.backbone.conv_encoder.model.encoder.stages.3.layers.2.layer.2.normalization" \
           ".running_var" in hf
    back, unmapped = from_hf_state(hf, model)
    assert unmapped == []
    own = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == own.keys()
    assert all(torch.equal(back[k], own[k]) for k in own)
    prefix = "model.backbone.conv_encoder.model."
    timm = {prefix + k[len("backbone.body."):]: v for k, v in state.items()
            if k.startswith("backbone.body.")}
    timm_back, unmapped = from_hf_state(timm, model)
    assert unmapped == [] and timm_back.keys() == {k for k in own if k.startswith("backbone.")}


def test_directory_saved_by_transformers_imports(tmp_path, transformers) -> None:
    """A transformers model saved with its own save_pretrained (the public checkpoints'
    layout: box-refinement heads only under model.decoder.bbox_embed) reads back to a detector
    that reproduces it."""
    from siamese_detr.convert.hf import hf_config

    model = to_dict(_run_config("deformable", 1, refine=True))["model"]
    config = transformers.DeformableDetrConfig(**{
        k: v for k, v in hf_config(model, {0: "a", 1: "b", 2: "c", 3: "d"}).items()
        if k not in ("model_type", "architectures")})
    torch.manual_seed(3)
    hf = transformers.DeformableDetrForObjectDetection(config).eval()
    hf.save_pretrained(tmp_path / "pub")
    det, _ = build_from_source(read_source(tmp_path / "pub"))
    b = _batch()
    with torch.no_grad():
        want = hf(pixel_values=b.images, pixel_mask=(~b.mask).long())
        got = det(b)
    assert (got.logits[-1] - want.logits).abs().max() < HF_TOL
    assert (got.boxes[-1] - want.pred_boxes).abs().max() < HF_TOL


def test_pretraining_checkpoint_exports_without_class_head(tmp_path, transformers) -> None:
    from siamese_detr.convert.hf import export_hf_dir

    ckpt = _checkpoint("conditional", kind="pretrain")
    result = export_hf_dir(read_source(_save(ckpt, tmp_path / "p.pt")), tmp_path / "hf")
    assert not result.class_head and "class head" in result.notes[0]
    hf, info = transformers.ConditionalDetrForObjectDetection.from_pretrained(
        tmp_path / "hf", num_labels=7, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["class_labels_classifier.bias",
                                            "class_labels_classifier.weight"]
    assert not info["unexpected_keys"] and hf.config.num_labels == 7
    assert "not included" in (tmp_path / "hf" / "README.md").read_text()


def test_swav_backbone_licence_in_card() -> None:
    from siamese_detr.convert.hf import hf_config, model_card

    ckpt = _checkpoint("vanilla")
    ckpt["config"]["model"]["backbone"]["weights"] = "/w/swav_800ep_pretrain.pth.tar"
    card = model_card(ckpt, hf_config(ckpt["config"]["model"], {0: "x"}), True)
    assert "CC BY-NC 4.0" in card


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("variant,loss,needle", [
    ("vanilla", "focal", "softmax over num_labels + 1"),
    ("conditional", "ce", "sigmoid over num_labels"),
    ("deformable", "ce", "sigmoid over num_labels"),
])
def test_heads_transformers_cannot_represent_are_refused(variant, loss, needle, tmp_path,
                                                         capsys) -> None:
    from siamese_detr.cli.main import main

    cfg = _run_config(variant, cls_loss=loss)
    from siamese_detr.config import resolved_cls_loss

    model = to_dict(cfg)["model"]
    assert needle in unsupported_reason(model, resolved_cls_loss(cfg.model, cfg.loss))
    assert unsupported_reason(model, "ce" if loss == "focal" else "focal") is None
    if variant == "vanilla":  # the CLI prints the reason as one line and exits 2
        pytest.importorskip("transformers")
        from siamese_detr.losses.set_criterion import num_logits
        from siamese_detr.models.detector import build_detector

        det = build_detector(cfg.model, num_logits(cfg.model, cfg.loss))
        path = _save({"model": det.state_dict(), "config": to_dict(cfg), "kind": "finetune"},
                     tmp_path / "c.pt")
        assert main(["export", str(path), "--to", "hf", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "transformers cannot represent" in err[0] and needle in err[0]
        assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("change,needle", [
    ({"two_stage": True}, "two-stage"),
    ({"position_embedding_type": "learned"}, "learned position embeddings"),
    ({"dilation": True}, "dilated"),
    ({"decoder_attention_heads": 4}, "encoder_attention_heads != decoder_attention_heads"),
    ({"backbone_config": {"model_type": "resnet", "layer_type": "bottleneck",
                          "depths": [3, 4, 23, 3]}}, "not ResNet-18/34/50"),
    ({"model_type": "yolos"}, "model_type 'yolos'"),
])
def test_transformers_configs_we_cannot_import_are_refused(change, needle) -> None:
    from siamese_detr.convert.hf import hf_config

    config = hf_config(to_dict(_run_config("deformable", 2))["model"], {0: "a"})
    config.update(change)
    with pytest.raises(HfError, match=needle):
        model_overrides(config)


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("name", ["vanilla", "conditional", "deformable"])
def test_onnx_matches_pytorch(name, tmp_path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from siamese_detr.convert.onnx import OnnxDetector, check_onnx, export_onnx

    ckpt = _checkpoint(name)
    det, _ = build_from_source(read_source_dict(ckpt))
    wrapper = OnnxDetector(det)
    path = export_onnx(wrapper, tmp_path / "model.onnx", 64, 96)
    g = torch.Generator().manual_seed(2)
    check = check_onnx(wrapper, path, torch.randn(2, 3, 64, 96, generator=g))
    assert check.max_abs < ONNX_TOL
    # the wrapper's outputs are the detector's, post-processed
    images = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        scores, boxes = wrapper(images)
        out = det(ImageBatch(images=images, mask=torch.zeros(1, 64, 96, dtype=torch.bool),
                             sizes=torch.tensor([[64, 96]])))
    probs = out.logits[-1].sigmoid() if name != "vanilla" else out.logits[-1].softmax(-1)[..., :4]
    torch.testing.assert_close(scores, probs)
    cx, w = out.boxes[-1][..., 0] * 96, out.boxes[-1][..., 2] * 96
    torch.testing.assert_close(boxes[..., 0], cx - w / 2)
    torch.testing.assert_close(boxes[..., 2], cx + w / 2)
    if name == "vanilla":  # DETR's graph takes other image sizes too
        other = check_onnx(wrapper, path, torch.randn(1, 3, 96, 64, generator=g))
        assert other.max_abs < ONNX_TOL


def test_cli_onnx_refuses_pretraining_checkpoint(tmp_path, capsys) -> None:
    from siamese_detr.cli.main import main

    path = _save(_checkpoint("vanilla", kind="pretrain"), tmp_path / "p.pt")
    assert main(["export", str(path), "--to", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "fine-tune it first" in capsys.readouterr().err


# ----------------------------------------------------------------------------- our folder
def test_safetensors_folder_round_trip_without_pickle(tmp_path, capsys) -> None:
    from siamese_detr.cli.main import main
    from siamese_detr.configio import load_yaml

    ckpt = _checkpoint("deformable")
    logits, boxes = _ours("deformable")
    path = _save(ckpt, tmp_path / "c.pt")
    assert main(["export", str(path), "--to", "safetensors", "--out", str(tmp_path / "f")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["config.yaml",
                                                                  "model.safetensors"]
    assert is_folder(tmp_path / "f")
    assert load_yaml(tmp_path / "f" / "config.yaml").model.variant == "deformable"
    loaded = load_folder(tmp_path / "f")
    assert loaded["kind"] == "finetune" and loaded["categories"] == CATEGORIES
    det, _ = build_from_source(read_source(tmp_path / "f"))
    with torch.no_grad():
        out = det(_batch())
    assert torch.equal(out.logits[-1], logits) and torch.equal(out.boxes[-1], boxes)


def test_save_folder_writes_shared_heads_once_per_name(tmp_path) -> None:
    ckpt = _checkpoint("deformable")  # class_embed.0 and .1 are one module
    save_folder(tmp_path / "f", ckpt["model"], ckpt["config"], "finetune")
    state = load_folder(tmp_path / "f")["model"]
    assert torch.equal(state["class_embed.0.weight"], state["class_embed.1.weight"])


def test_not_a_detector_folder_is_one_line(tmp_path, capsys) -> None:
    from siamese_detr.cli.main import main

    (tmp_path / "d").mkdir()
    assert main(["export", str(tmp_path / "d"), "--to", "safetensors",
                 "--out", str(tmp_path / "o")]) == 2
    assert "neither a detector folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --init DIR
def test_load_init_from_transformers_dir_reinitialises_only_class_head(tmp_path,
                                                                       transformers) -> None:
    from siamese_detr.convert.hf import export_hf_dir
    from siamese_detr.eval.loading import init_from_checkpoint as load_init
    from siamese_detr.models.detector import build_detector

    ckpt = _checkpoint("conditional")
    export_hf_dir(read_source(_save(ckpt, tmp_path / "c.pt")), tmp_path / "hf")
    cfg = _run_config("conditional")
    target = build_detector(ModelConfig(**{**cfg.model.__dict__, "num_classes": 9}), 9)
    report = load_init(target, tmp_path / "hf", "conditional")
    assert sorted(report.skipped_shape) == ["class_embed.bias", "class_embed.weight"]
    assert report.unexpected == []
    src = ckpt["model"]
    for key, value in target.state_dict().items():
        if not key.startswith("class_embed") and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, src[key]), key
    wrong = build_detector(ModelConfig(**{**cfg.model.__dict__, "num_queries": 7}), 4)
    with pytest.raises(Exception, match="model.num_queries=5"):
        load_init(wrong, tmp_path / "hf", "conditional")


def test_load_detector_reads_folder_without_torch_load(tmp_path, monkeypatch) -> None:
    """The redesign's load_detector takes our folder; no pickle reader is touched."""
    from siamese_detr.eval.loading import load_detector

    ckpt = _checkpoint("vanilla")
    logits, boxes = _ours("vanilla")
    save_folder(tmp_path / "f", ckpt["model"], ckpt["config"], "finetune", CATEGORIES)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_detector(tmp_path / "f")
    assert loaded.kind == "finetune" and loaded.missing == []
    with torch.no_grad():
        out = loaded.detector(_batch())
    assert torch.equal(out.logits[-1], logits) and torch.equal(out.boxes[-1], boxes)
