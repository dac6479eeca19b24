"""Pictures and the markdown report of a demo run (proposals, views, curves, predictions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from siamese_detr.engine.logging import read_jsonl
from siamese_detr.files import write_json, write_text

COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
          (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_boxes(image: Image.Image, boxes: np.ndarray, labels: list[str] | None = None,
               width: int = 2) -> Image.Image:
    """``boxes``: ``[K, 4]`` absolute xyxy. Returns a copy with the boxes drawn."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    for i, box in enumerate(np.asarray(boxes, dtype=float).reshape(-1, 4)):
        color = COLORS[i % len(COLORS)]
        draw.rectangle([float(v) for v in box], outline=color, width=width)
        if labels is not None and i < len(labels):
            draw.text((float(box[0]) + 2, float(box[1]) + 1), labels[i], fill=color)
    return image


def grid(images: list[Image.Image], cols: int) -> Image.Image:
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w + (cols - 1) * 4, rows * h + (rows - 1) * 4), "white")
    for k, im in enumerate(images):
        canvas.paste(im, ((k % cols) * (w + 4), (k // cols) * (h + 4)))
    return canvas


def proposals_figure(store_dir: Path, images_dir: Path, path: Path, n: int = 4,
                     top: int = 10) -> Path:
    from siamese_detr.proposals.store import ProposalStore

    store = ProposalStore.open(store_dir)
    tiles = []
    for image_id in sorted(store.ids())[:n]:
        boxes, _ = store.get(image_id, top_k=top)
        tiles.append(draw_boxes(Image.open(images_dir / image_id), boxes))
    grid(tiles, min(n, 4)).save(path)
    return path


def loss_figure(run_dirs: dict[str, Path], path: Path, keys: tuple[str, ...]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(5 * len(run_dirs), 3.6), squeeze=False)
    for ax, (title, run_dir) in zip(axes[0], run_dirs.items()):
        rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
        steps = [r["step"] for r in rows]
        for key in keys:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], label=key)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def predictions_figure(ann_file: Path, images_dir: Path, predictions: dict[str, Path],
                       path: Path, n: int = 4, min_score: float = 0.3) -> Path:
    """Ground truth (white) and the predictions of each run drawn on ``n`` held-out images."""
    gt = json.loads(ann_file.read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = sorted(gt["images"], key=lambda im: im["id"])[:n]
    rows = []
    for title, pred_path in predictions.items():
        preds = json.loads(pred_path.read_text()) if pred_path.is_file() else []
        for im in images:
            dets = [p for p in preds if p["image_id"] == im["id"] and p["score"] >= min_score]
            dets = sorted(dets, key=lambda p: -p["score"])[:3]
            base = Image.open(images_dir / im["file_name"]).convert("RGB")
            draw = ImageDraw.Draw(base)
            for a in gt["annotations"]:
                if a["image_id"] == im["id"]:
                    x, y, w, h = a["bbox"]
                    draw.rectangle([x, y, x + w, y + h], outline=(255, 255, 255), width=1)
            boxes = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                               d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
            labels = [f"{title}: {names.get(d['category_id'], d['category_id'])} "
                      f"{d['score']:.2f}" for d in dets]
            rows.append(draw_boxes(base, boxes, labels))
    grid(rows, len(images)).save(path)
    return path


def results_table(out: Path) -> dict[str, dict[str, float]]:
    """``{"scratch": metrics, "siamese": metrics}`` as written by the evaluator."""
    table = {}
    for name in ("scratch", "siamese"):
        path = out / "runs" / f"finetune_{name}" / "eval_metrics.json"
        table[name] = json.loads(path.read_text()) if path.is_file() else {}
    return table


def _fmt(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, float) and v >= 0 else "n/a"


def write_report(out: Path, plan: Any, seconds: float, pretrain_cfg: Any) -> Path:
    """Write ``out/report.md`` and its PNGs; returns the report path. ``plan`` is the
    demo's ``DemoPlan``, ``pretrain_cfg`` the RunConfig of its pretraining stage."""
    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    proposals_figure(data / "proposals", data / "unlabeled", fig / "proposals.png")
    _views_figure(pretrain_cfg, fig / "views.png")
    loss_figure({"Siamese DETR pretraining": out / "runs" / "pretrain"}, fig / "pretrain_loss.png",
                ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_region", "loss_global"))
    loss_figure({"fine-tune from scratch": out / "runs" / "finetune_scratch",
                 "fine-tune from Siamese DETR": out / "runs" / "finetune_siamese"},
                fig / "finetune_loss.png", ("loss", "loss_ce", "loss_bbox", "loss_giou"))
    det = data / "detection"
    predictions_figure(det / "val.json", det / "val", {
        "scratch": out / "runs" / "finetune_scratch" / "predictions.json",
        "siamese": out / "runs" / "finetune_siamese" / "predictions.json"},
        fig / "predictions.png", min_score=0.25)
    table = results_table(out)
    rows = []
    for name, label in (("scratch", "from scratch"), ("siamese", "Siamese DETR init")):
        m = table[name]
        rows.append(f"| {label} | {_fmt(m.get('coco/AP'))} | {_fmt(m.get('coco/AP50'))} | "
                    f"{_fmt(m.get('coco/AP75'))} |")
    write_json(out / "results.json", table, indent=2)
    text = REPORT.format(variant=plan.variant, minutes=seconds / 60, n_unlabeled=plan.n_unlabeled,
                         n_train=plan.n_train, n_val=plan.n_val, pre=plan.pretrain_iters,
                         ft=plan.finetune_iters, rows="\n".join(rows))
    path = out / "report.md"
    write_text(path, text)
    return path


def _views_figure(pretrain_cfg: Any, path: Path) -> None:
    from siamese_detr.methods.siamese.data import build_pretrain_dataset, draw_views

    dataset = build_pretrain_dataset(pretrain_cfg)
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            draw_views(sample, path, scale=2)
            return


REPORT = """# siamese-detr demo report

**This is a toy-scale run** ({minutes:.1f} min on CPU): a {variant} DETR with a ResNet-18
backbone, {n_unlabeled} unlabeled images, only {n_train} labeled training images (scarce labels,
the setting self-supervised pretraining is meant for) and {n_val} held-out images, all
generated from photos shipped with scikit-image. SwAV weights cannot be downloaded here, so
the frozen backbone is a stand-in warmed up without any label (it learns which shipped photo a
crop comes from) and shared by both fine-tuning runs. The numbers say that the pipeline runs
end to end and that pretraining transfers on this toy data; on {n_val} held-out images they move
by several AP points from seed to seed (README: means over seeds), and they say nothing about
the paper's results. The real recipes are in the README
(`siamese-detr config list` shows them).

## 1. Offline EdgeBoxes proposals (top 10 per image)

![proposals](figures/proposals.png)

## 2. Two views of one image and their shared regions (same colour = same region)

Region 0 is the overlap of the two views; the others are proposals that survive in both.

![views](figures/views.png)

## 3. Siamese DETR pretraining ({pre} iterations)

![pretraining losses](figures/pretrain_loss.png)

## 4. Fine-tuning ({ft} iterations each, same budget and seed)

![fine-tuning losses](figures/finetune_loss.png)

Predictions on held-out images (white: ground truth; top row: from scratch, bottom row:
Siamese DETR initialisation; the 3 best detections with score >= 0.25):

![predictions](figures/predictions.png)

## 5. Results on the held-out images

Metric: COCO-style AP@[.5:.95] / AP50 / AP75 (pycocotools), in %.

| initialisation | AP | AP50 | AP75 |
| --- | --- | --- | --- |
{rows}

## Next: the real recipes

```bash
siamese-detr proposals run data/imagenet/train --out data/proposals/imagenet --workers 64
torchrun --nproc-per-node 8 -m siamese_detr pretrain --preset siamese/conditional-100q/in1k \\
    model.backbone.weights=weights/swav_800ep_pretrain.pth.tar
siamese-detr finetune --preset finetune/conditional-100q/coco --init runs/.../last.pt
```
"""
