"""Pictures and the markdown report of a demo run (proposals, views, curves, predictions)."""

from __future__ import annotations

import json
import statistics
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


TOY_CAPTION = ("Solid boxes with a filled tag: predictions (colour = predicted class, number "
               "= score). Dashed black-and-white boxes: ground truth. The red, green and blue "
               "frames inside the objects are part of the toy images' pixels, not boxes.")


def _gt_boxes(gt: dict[str, Any], image_id: int) -> np.ndarray:
    boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
              a["bbox"][1] + a["bbox"][3]] for a in gt["annotations"] if a["image_id"] == image_id]
    return np.asarray(boxes, dtype=float).reshape(-1, 4)


def _titled(tile: Image.Image, title: str) -> Image.Image:
    from siamese_detr.eval.draw import load_font

    size = max(12, tile.width // 22)
    band = Image.new("RGB", (tile.width, size + 8), "white")
    ImageDraw.Draw(band).text((4, 4), title, fill=(0, 0, 0), font=load_font(size))
    out = Image.new("RGB", (tile.width, tile.height + band.height), "white")
    out.paste(band, (0, 0))
    out.paste(tile, (0, band.height))
    return out


def predictions_figure(ann_file: Path, images_dir: Path, predictions: dict[str, Path],
                       path: Path, n: int = 4, min_score: float = 0.3, top: int = 3) -> Path:
    """One row per run (its ``top`` best detections with score >= ``min_score``) over the same
    ``n`` held-out images, ground truth dashed, drawn by
    :func:`siamese_detr.eval.draw.draw_detections` (as ``siamese-detr predict``), one legend
    and caption under the grid."""
    from siamese_detr.eval.draw import class_color, draw_detections, legend_band

    gt = json.loads(ann_file.read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = sorted(gt["images"], key=lambda im: im["id"])[:n]
    tiles = []
    for title, pred_path in predictions.items():
        preds = json.loads(pred_path.read_text()) if pred_path.is_file() else []
        for im in images:
            dets = [p for p in preds if p["image_id"] == im["id"] and p["score"] >= min_score]
            dets = sorted(dets, key=lambda p: -p["score"])[:top]
            boxes = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                               d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
            base = Image.open(images_dir / im["file_name"]).convert("RGB")
            tile = draw_detections(
                base, boxes, [d["score"] for d in dets], [d["category_id"] for d in dets],
                [str(names.get(d["category_id"], f"class {d['category_id']}")) for d in dets],
                gt_boxes=_gt_boxes(gt, im["id"]), legend=False, min_side=320)
            tiles.append(_titled(tile, f"{title}, image {im['id']}"))
    body = grid(tiles, len(images))
    band = legend_band(body.width, [(str(n), class_color(k)) for k, n in sorted(names.items())],
                       True, TOY_CAPTION + f" Best {top} detections with score >= "
                       f"{min_score:g} per image.", max(12, body.width // 70))
    canvas = Image.new("RGB", (body.width, body.height + band.height), "white")
    canvas.paste(body, (0, 0))
    canvas.paste(band, (0, body.height))
    canvas.save(path)
    return path


def predict_figure(checkpoint: Path, ann_file: Path, images_dir: Path, path: Path,
                   threshold: float = 0.3) -> Path:
    """What ``siamese-detr predict CHECKPOINT IMAGE`` draws for the first held-out image
    (:meth:`~siamese_detr.eval.loading.LoadedDetector.predict`, the same drawing), with its
    ground truth dashed."""
    from siamese_detr.eval.draw import draw_detections
    from siamese_detr.eval.loading import load_detector

    gt = json.loads(ann_file.read_text())
    im = sorted(gt["images"], key=lambda i: i["id"])[0]
    det = load_detector(checkpoint, "cpu")
    picture = Image.open(images_dir / im["file_name"]).convert("RGB")
    found = det.predict(picture, score_threshold=threshold)[0]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    labels = found.labels.tolist()
    tags = [n if det.categories else str(names.get(v, n)) for v, n in zip(labels, found.names)]
    drawn = draw_detections(picture, found.boxes, found.scores.tolist(), labels, tags,
                            gt_boxes=_gt_boxes(gt, im["id"]),
                            legend_names=names,
                            caption=f"siamese-detr predict on held-out image {im['file_name']} "
                                    f"({len(found)} detections with score >= {threshold:g}). "
                                    + TOY_CAPTION)
    drawn.save(path)
    return path


ARMS = {"scratch": "from scratch", "siamese": "Siamese DETR init"}
METRICS = ("coco/AP", "coco/AP50", "coco/AP75")


def finetune_run_name(arm: str, seed: int) -> str:
    """Run folder (under ``OUT/runs``) of the fine-tuning ``arm`` ("scratch"/"siamese")."""
    return f"finetune_{arm}_seed{seed}"


def plan_seeds(plan: Any) -> list[int]:
    """The fine-tuning seeds of a ``DemoPlan``: ``seed, seed + 1, ...``."""
    return [plan.seed + k for k in range(max(1, plan.finetune_seeds))]


def _seed_of(run_dir: Path) -> int:
    return int(run_dir.name.rsplit("_seed", 1)[1])


def finetune_run_dirs(out: Path, arm: str) -> list[Path]:
    """The arm's fine-tuning run folders that finished evaluation, in seed order."""
    runs = [p.parent for p in (out / "runs").glob(f"finetune_{arm}_seed*/eval_metrics.json")]
    return sorted(runs, key=_seed_of)


def _mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample sd (``statistics``); NaN for no value, sd 0 for one."""
    if not values:
        return {"mean": float("nan"), "sd": 0.0}
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def results_table(out: Path, seeds: list[int] | None = None) -> dict[str, Any]:
    """The comparison as written to ``results.json``: per arm the evaluator's metrics of every
    fine-tuning seed (``runs``; only ``seeds`` when given) with their ``mean`` and sample
    ``sd``; under ``gain`` the Siamese-minus-scratch AP differences of runs with the same seed
    (mean, sd, wins)."""
    table: dict[str, Any] = {}
    for arm in ARMS:
        runs = {str(_seed_of(d)): json.loads((d / "eval_metrics.json").read_text())
                for d in finetune_run_dirs(out, arm) if seeds is None or _seed_of(d) in seeds}
        stats = {k: _mean_sd([m[k] for m in runs.values() if k in m]) for k in METRICS}
        table[arm] = {"runs": runs, "mean": {k: v["mean"] for k, v in stats.items()},
                      "sd": {k: v["sd"] for k, v in stats.items()}}
    pairs = sorted(set(table["scratch"]["runs"]) & set(table["siamese"]["runs"]), key=int)
    diffs = [table["siamese"]["runs"][s]["coco/AP"] - table["scratch"]["runs"][s]["coco/AP"]
             for s in pairs]
    table["gain"] = {"coco/AP": {**_mean_sd(diffs), "wins": sum(d > 0 for d in diffs),
                                 "pairs": len(diffs)}}
    return table


def results_lines(table: dict[str, Any]) -> list[str]:
    """The comparison in a few printable lines (AP in %, mean ± sd over fine-tuning seeds)."""
    n = max(len(table[arm]["runs"]) for arm in ARMS)
    lines = [f"COCO AP@[.5:.95] / AP50 on the held-out toy images (%), mean ± sd over {n} "
             "fine-tuning seeds:"]
    for arm in ARMS:
        mean, sd = table[arm]["mean"], table[arm]["sd"]
        each = " ".join(_fmt(m.get("coco/AP")) for m in table[arm]["runs"].values())
        lines.append(f"  {arm:8s} AP {_pm(mean['coco/AP'], sd['coco/AP'])}   AP50 "
                     f"{_pm(mean['coco/AP50'], sd['coco/AP50'])}   (AP per seed: {each})")
    gain = table["gain"]["coco/AP"]
    lines.append(f"  Siamese DETR minus scratch, same seed: {100 * gain['mean']:+.1f} ± "
                 f"{100 * gain['sd']:.1f} AP, better in {gain['wins']} of {gain['pairs']}")
    return lines


def _pm(mean: float, sd: float) -> str:
    return f"{100 * mean:5.1f} ± {100 * sd:3.1f}" if mean == mean else "  n/a"


def _fmt(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, float) and v >= 0 else "n/a"


def write_report(out: Path, plan: Any, seconds: float, pretrain_cfg: Any) -> Path:
    """Write ``out/report.md``, ``out/results.json`` and the PNGs; returns the report path.
    ``plan`` is the demo's ``DemoPlan``, ``pretrain_cfg`` the RunConfig of its pretraining
    stage. Curves and pictures show the first fine-tuning seed of each arm."""
    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    first = {arm: out / "runs" / finetune_run_name(arm, plan.seed) for arm in ARMS}
    proposals_figure(data / "proposals", data / "unlabeled", fig / "proposals.png")
    _views_figure(pretrain_cfg, fig / "views.png")
    loss_figure({"Siamese DETR pretraining": out / "runs" / "pretrain"}, fig / "pretrain_loss.png",
                ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_region", "loss_global"))
    loss_figure({f"fine-tune from scratch (seed {plan.seed})": first["scratch"],
                 f"fine-tune from Siamese DETR (seed {plan.seed})": first["siamese"]},
                fig / "finetune_loss.png", ("loss", "loss_ce", "loss_bbox", "loss_giou"))
    det = data / "detection"
    predictions_figure(det / "val.json", det / "val",
                       {arm: first[arm] / "predictions.json" for arm in ARMS},
                       fig / "predictions.png", min_score=0.25)
    predict_figure(first["siamese"] / "last.pt", det / "val.json", det / "val",
                   fig / "predict.png")
    table = results_table(out, plan_seeds(plan))
    seeds = sorted({int(s) for arm in ARMS for s in table[arm]["runs"]})
    rows = []
    for arm, label in ARMS.items():
        runs, mean, sd = table[arm]["runs"], table[arm]["mean"], table[arm]["sd"]
        per_seed = " | ".join(_fmt(runs.get(str(s), {}).get("coco/AP")) for s in seeds)
        rows.append(f"| {label} | {per_seed} | **{_pm(mean['coco/AP'], sd['coco/AP']).strip()}**"
                    f" | {_pm(mean['coco/AP50'], sd['coco/AP50']).strip()} | "
                    f"{_pm(mean['coco/AP75'], sd['coco/AP75']).strip()} |")
    gain = table["gain"]["coco/AP"]
    write_json(out / "results.json", table, indent=2)
    text = REPORT.format(
        variant=plan.variant, minutes=seconds / 60, n_unlabeled=plan.n_unlabeled,
        n_train=plan.n_train, n_val=plan.n_val, pre=plan.pretrain_iters,
        ft=plan.finetune_iters, n_seeds=len(seeds), seed=plan.seed,
        run=finetune_run_name("siamese", plan.seed),
        seed_cols=" | ".join(f"AP seed {s}" for s in seeds),
        seed_rule=" | ".join("---" for _ in seeds), rows="\n".join(rows),
        gain=f"{100 * gain['mean']:+.1f} ± {100 * gain['sd']:.1f}", wins=gain["wins"],
        pairs=gain["pairs"])
    path = out / "report.md"
    write_text(path, text)
    return path


def _views_figure(pretrain_cfg: Any, path: Path) -> None:
    from siamese_detr.configio import apply_overrides
    from siamese_detr.methods.siamese.data import build_pretrain_dataset, draw_views

    # the figure shows finished samples: augmented in the worker even where a GPU would
    # finish them (augment_on=device leaves views un-coloured and crops uncut)
    cfg = apply_overrides(pretrain_cfg, ["pretrain.siamese.augment_on=worker"])
    dataset = build_pretrain_dataset(cfg)
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            draw_views(sample, path, scale=2, per_region=True)
            return


REPORT = """# siamese-detr demo report

**This is a toy-scale run** ({minutes:.1f} min on CPU): a {variant} DETR with a ResNet-18
backbone, {n_unlabeled} unlabeled images, only {n_train} labeled training images (scarce labels,
the setting self-supervised pretraining is meant for) and {n_val} held-out images, all
generated from photos shipped with scikit-image. SwAV weights cannot be downloaded here, so
the frozen backbone is a stand-in warmed up without any label (it learns which shipped photo a
crop comes from) and shared by both fine-tuning runs. The numbers say that the pipeline runs
end to end and that pretraining transfers on this toy data; on {n_val} held-out images they move
by several AP points from seed to seed, which is why every number below is a mean over
{n_seeds} fine-tuning seeds, and they say nothing about the paper's results. The real recipes
are in the README (`siamese-detr config list` shows them).

## 1. Offline EdgeBoxes proposals (top 10 per image)

![proposals](figures/proposals.png)

## 2. Two views of one image and their shared regions (same colour = same region)

Region 0 is the overlap of the two views; the others are proposals that survive in both.
Regions clipped to the overlap often share sides, so in the top row one outline can hide
most of another; each row below shows one region alone (filled) in both views, with its
size in pixels and its two `L_r` crops: exactly the boxes and crops that training uses.

![views](figures/views.png)

## 3. Siamese DETR pretraining ({pre} iterations)

![pretraining losses](figures/pretrain_loss.png)

## 4. Fine-tuning ({ft} iterations each, same budget, {n_seeds} seeds per arm)

Curves of seed {seed}:

![fine-tuning losses](figures/finetune_loss.png)

Predictions on held-out images (dashed black-and-white: ground truth; solid boxes with a
filled tag: predictions, colour = class; top row: from scratch, bottom row: Siamese DETR
initialisation, seed {seed}; the 3 best detections with score >= 0.25). The red, green and
blue frames inside the toy objects are part of the images' pixels, not boxes:

![predictions](figures/predictions.png)

`siamese-detr predict runs/{run}/last.pt IMAGE --out DIR` on a held-out image (all
detections with score >= 0.3; the same drawing):

![predict](figures/predict.png)

## 5. Results on the held-out images

Metric: COCO-style AP@[.5:.95] / AP50 / AP75 (pycocotools), in %; mean ± sd over the
{n_seeds} fine-tuning seeds (sample sd).

| initialisation | {seed_cols} | AP | AP50 | AP75 |
| --- | {seed_rule} | --- | --- | --- |
{rows}

Siamese DETR initialisation minus scratch, runs with the same seed: **{gain} AP**, better in
{wins} of {pairs}.

## Next: the real recipes

```bash
siamese-detr proposals run data/imagenet/train --out data/proposals/imagenet --workers 64
torchrun --nproc-per-node 8 -m siamese_detr pretrain --preset siamese/conditional-100q/in1k \\
    model.backbone.weights=weights/swav_800ep_pretrain.pth.tar
siamese-detr finetune --preset finetune/conditional-100q/coco --init runs/.../last.pt
```
"""
