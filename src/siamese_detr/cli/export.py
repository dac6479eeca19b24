"""``siamese-detr export CHECKPOINT --to {hf,onnx,safetensors} --out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from siamese_detr.errors import UserError

_EXTRA = 'install the export extra: pip install "siamese-detr[export]"'


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a detector to transformers, ONNX or a safetensors folder",
        description="Export a pretraining or fine-tuning checkpoint (or one of our folders) "
        "to: hf = a transformers directory (DetrForObjectDetection, "
        "ConditionalDetrForObjectDetection or DeformableDetrForObjectDetection, with "
        "config.json, preprocessor_config.json, model.safetensors and a model card); "
        "onnx = DIR/model.onnx, images in, scores and xyxy pixel boxes out, checked against "
        "PyTorch with onnxruntime; safetensors = our pickle-free folder (model.safetensors + "
        "config.yaml).")
    p.add_argument("checkpoint", help="our checkpoint (.pt), our folder or a transformers dir")
    p.add_argument("--to", required=True, choices=["hf", "onnx", "safetensors"], dest="target")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="onnx: traced input size (Deformable DETR's graph keeps it fixed; "
                        "default: data.val_size square)")
    p.set_defaults(func=run)


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"--to needs the '{module}' package: {_EXTRA}")


def run(args: argparse.Namespace) -> int:
    from siamese_detr.convert.source import read_source

    source = read_source(args.checkpoint)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    match args.target:
        case "hf":
            return _to_hf(source, out)
        case "onnx":
            return _to_onnx(source, out, args.image_size)
        case _:
            return _to_folder(source, out)


def _to_hf(source: dict, out: Path) -> int:
    from siamese_detr.convert.hf import HfError, export_hf_dir

    _need("transformers")
    try:
        result = export_hf_dir(source, out)
    except HfError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {result.folder}: {result.architecture}, {result.num_tensors} tensors "
          "(config.json, preprocessor_config.json, model.safetensors, README.md)")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _to_onnx(source: dict, out: Path, size: list[int] | None) -> int:
    import torch

    from siamese_detr.convert.onnx import OnnxDetector, check_onnx, export_onnx
    from siamese_detr.convert.source import build_from_source

    _need("onnx")
    _need("onnxruntime")
    if source["kind"] == "pretrain":
        raise UserError("--to onnx needs a fine-tuned detector; this is a pretraining "
                        "checkpoint (its class head is the pretext head): fine-tune it first")
    detector, cfg = build_from_source(source)
    wrapper = OnnxDetector(detector)
    h, w = size or (cfg.data.val_size, cfg.data.val_size)
    path = export_onnx(wrapper, out / "model.onnx", h, w)
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    check = check_onnx(wrapper, path, images)
    fixed = " (fixed H, W)" if cfg.model.variant == "deformable" else " (any H, W)"
    print(f"wrote {path}: images [B, 3, {h}, {w}]{fixed} -> scores [B, "
          f"{cfg.model.num_queries}, {cfg.model.num_classes}], boxes [B, "
          f"{cfg.model.num_queries}, 4] (xyxy pixels)")
    print(f"onnxruntime vs PyTorch on {list(check.shape)}: max abs error scores "
          f"{check.scores:.2e}, boxes {check.boxes:.2e}")
    return 0


def _to_folder(source: dict, out: Path) -> int:
    from siamese_detr.convert.folder import save_folder

    folder = save_folder(out, source["model"], source["config"], source["kind"],
                         source.get("categories"))
    print(f"wrote {folder}: model.safetensors ({len(source['model'])} tensors), config.yaml")
    return 0
