"""Transfer benchmark: every pretraining method against scratch, same fine-tuning protocol.

For one detector variant on the demo's toy data (labeled set, unlabeled images, EdgeBoxes
proposals, the label-free photo-id ResNet-18 standing in for SwAV), it runs

* one pretraining per method in ``--methods`` and ``--pretrain-seeds`` (preset
  ``tiny/<variant>/<method>``; a method without that preset is reported as skipped),
* fine-tuning from each pretrained checkpoint and from scratch with every
  ``--finetune-seeds``, the same budget, evaluated every ``--eval-every`` iterations,

as ``siamese-detr`` subprocesses, ``--jobs`` at a time with one thread each, then writes into
``--out``: ``table.md`` (mean ± sd over runs of COCO AP/AP50/AP75, paired differences against
scratch with the same fine-tuning seed, one row per run), ``ap_vs_step.png``, ``summary.json``
and ``configs/<run>.yaml`` (the exact config of every run). A finished run is never re-run and
an interrupted one continues from its ``last.pt``, so the command can be stopped and started
again.

    python bench/transfer.py --out /tmp/transfer --variant deformable \
        --methods siamese,updetr,detreg --finetune-seeds 0 1

``--dry-run`` prints the plan and the time estimate only. The default budget is estimated at
about 41 minutes on 2 cores (see :func:`estimate_minutes`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from siamese_detr.config import RunConfig
from siamese_detr.configio import apply_overrides
from siamese_detr.demo import BACKBONE_FILE, DemoPlan, finetune_config, make_data, make_proposals
from siamese_detr.demo.jobs import run_job
from siamese_detr.engine.logging import read_jsonl
from siamese_detr.errors import UserError
from siamese_detr.presets import PRESETS, get_preset

METHODS = ("siamese", "updetr", "detreg")
LABELS = {"scratch": "from scratch", "siamese": "Siamese DETR", "updetr": "UP-DETR",
          "detreg": "DETReg"}
METRICS = ("coco/AP", "coco/AP50", "coco/AP75")

# Cost of one training step relative to a tiny fine-tuning step (batch 4, 160 px), measured
# interleaved in one process with bench/bench_steps.py (deformable, 1 thread, under load):
# Siamese 1.06 s, DETReg 0.58 s, fine-tuning 0.77 s. UP-DETR is not measured (assumed 1.0).
STEP_COST = {"finetune": 1.0, "siamese": 1.4, "detreg": 0.76, "updetr": 1.0}
# Seconds per fine-tuning-step equivalent on 2 cores, from the demo's measured 16 min 13 s
# (2000 Siamese + 1200 fine-tuning steps = 4000 equivalents in ~13.5 min after ~3 min of data).
SECONDS_PER_STEP = 0.2
DATA_MINUTES = 3.0
EVAL_STEPS = 4.0  # one evaluation of 64 images, in step equivalents


def estimate_minutes(methods: list[str], n_pre: int, n_ft: int, pretrain_iters: int,
                     finetune_iters: int, evals_per_run: int) -> float:
    """Wall-clock estimate on 2 cores from step counts (see the constants above)."""
    pre = sum(STEP_COST[m] for m in methods) * n_pre * pretrain_iters
    runs = (1 + len(methods) * n_pre) * n_ft
    ft = runs * (finetune_iters * STEP_COST["finetune"] + evals_per_run * EVAL_STEPS)
    return DATA_MINUTES + (pre + ft) * SECONDS_PER_STEP / 60.0


# ------------------------------------------------------------------ table arithmetic (pure)
RunKey = tuple[int | None, int]  # (pretraining seed or None for scratch, fine-tuning seed)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def paired_differences(runs: dict[RunKey, dict[str, float]],
                       scratch: dict[RunKey, dict[str, float]], metric: str = "coco/AP"
                       ) -> list[float]:
    """``runs[(p, f)][metric] - scratch[(None, f)][metric]`` for every run whose fine-tuning
    seed ``f`` has a scratch run, in sorted key order."""
    base = {f: m[metric] for (_, f), m in scratch.items()}
    return [m[metric] - base[f] for (p, f), m in sorted(runs.items(), key=_key)
            if f in base]


def _key(item: tuple[RunKey, Any]) -> tuple[int, int]:
    (p, f), _ = item
    return (-1 if p is None else p, f)


@dataclass
class Row:
    init: str
    n: int
    stats: dict[str, tuple[float, float]]  # metric -> (mean, sd) in %
    diff: tuple[float, float] | None  # paired AP difference against scratch, (mean, sd) in %
    wins: int
    n_pairs: int


def summary_rows(results: dict[str, dict[RunKey, dict[str, float]]]) -> list[Row]:
    """One row per initialisation (``results["scratch"]`` first); metrics in % (x100)."""
    scratch = results.get("scratch", {})
    rows = []
    for init in ["scratch", *[k for k in results if k != "scratch"]]:
        runs = results.get(init, {})
        if not runs:
            continue
        stats = {m: tuple(100 * v for v in mean_sd([r[m] for r in runs.values()]))
                 for m in METRICS}
        diffs = [] if init == "scratch" else [100 * d for d in
                                              paired_differences(runs, scratch)]
        rows.append(Row(init, len(runs), stats,  # type: ignore[arg-type]
                        mean_sd(diffs) if diffs else None, sum(d > 0 for d in diffs),
                        len(diffs)))
    return rows


def _pm(ms: tuple[float, float], signed: bool = False) -> str:
    m, s = ms
    return f"{m:+.1f} ± {s:.1f}" if signed else f"{m:.1f} ± {s:.1f}"


def markdown_table(rows: list[Row], skipped: dict[str, str],
                   results: dict[str, dict[RunKey, dict[str, float]]], caption: str) -> str:
    """The paper-shaped summary table, the skipped methods, and one line per run."""
    lines = [caption, "",
             "| initialisation | AP | AP50 | AP75 | ΔAP vs scratch (paired) | wins | runs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        diff = "–" if r.diff is None else _pm(r.diff, signed=True)
        wins = "–" if r.diff is None else f"{r.wins}/{r.n_pairs}"
        lines.append(f"| {LABELS.get(r.init, r.init)} | {_pm(r.stats['coco/AP'])} | "
                     f"{_pm(r.stats['coco/AP50'])} | {_pm(r.stats['coco/AP75'])} | {diff} | "
                     f"{wins} | {r.n} |")
    for m, why in skipped.items():
        lines.append(f"| {LABELS.get(m, m)} | skipped: {why} | | | | | |")
    lines += ["", "Mean ± sample sd over runs, COCO AP in %. ΔAP: run minus the scratch run "
              "with the same fine-tuning seed.", "",
              "| initialisation | pretrain seed | fine-tune seed | AP | AP50 | AP75 |",
              "| --- | --- | --- | --- | --- | --- |"]
    for init, runs in results.items():
        for (p, f), m in sorted(runs.items(), key=_key):
            lines.append(f"| {LABELS.get(init, init)} | {'–' if p is None else p} | {f} | "
                         + " | ".join(f"{100 * m[k]:.1f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def ap_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, AP %)`` of every evaluation in ``metrics.jsonl`` (last one wins per step)."""
    points: dict[int, float] = {}
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        if "eval/coco/AP" in rec:
            points[int(rec["step"])] = 100 * float(rec["eval/coco/AP"])
    return sorted(points.items())


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path, title: str
                ) -> Path:
    """AP against fine-tuning step: thin lines per run, a thick line for the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (init, runs) in enumerate(curves.items()):
        colour = f"C{i}"
        by_step: dict[int, list[float]] = {}
        for run in runs:
            if run:
                ax.plot(*zip(*run), color=colour, alpha=0.25, lw=1)
            for s, v in run:
                by_step.setdefault(s, []).append(v)
        if by_step:
            steps = sorted(by_step)
            ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], color=colour, lw=2.2,
                    marker="o", label=f"{LABELS.get(init, init)} ({len(runs)} runs)")
    ax.set_xlabel("fine-tuning iteration")
    ax.set_ylabel("COCO AP (%)")
    ax.set_title(textwrap.fill(title, 90), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ running
def _train(kind: str, cfg: RunConfig, marker: str, configs: Path, mark: bool = False) -> None:
    """One run as a one-thread ``siamese-detr`` subprocess unless ``marker`` exists (an
    interrupted run continues from its ``last.pt``): :func:`siamese_detr.demo.jobs.run_job`
    (``mark``: the marker is written there after a successful run)."""
    try:
        run_job(kind, cfg, marker, configs, mark_done=mark)
    except UserError as e:
        raise SystemExit(str(e)) from None


def pretrain_config(out: Path, plan: DemoPlan, method: str, seed: int, iters: int,
                    extra: list[str]) -> RunConfig:
    """Preset ``tiny/<variant>/<method>`` on the demo's unlabeled images, proposals and
    backbone, with the demo's schedule rule (lr drop at 80 %)."""
    cfg = get_preset(f"tiny/{plan.variant}/{method}")
    return apply_overrides(replace(cfg, seed=seed, output_dir=str(
        out / "runs" / f"pre_{method}_s{seed}")), [
        f"model.backbone.weights={out / 'data' / BACKBONE_FILE}",
        "model.backbone.weights_format=torchvision",
        f"pretrain.images={out / 'data' / 'unlabeled'}",
        f"pretrain.proposals.store={out / 'data' / 'proposals'}",
        f"optim.length={iters}", f"optim.lr_drops={int(iters * 0.8)}",
        f"engine.ckpt_every={max(1, iters // 3)}", f"engine.log_every={max(1, iters // 30)}",
        "engine.keep_checkpoints=0", "engine.progress=false", *extra])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", default="deformable",
                   choices=["vanilla", "conditional", "deformable"])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated pretraining methods (siamese,updetr,detreg)")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pretrain-iters", type=int, default=2000)
    p.add_argument("--finetune-iters", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=200,
                   help="fine-tuning iterations between evaluations (the AP curve)")
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--n-unlabeled", type=int, default=320)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--backbone-steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--pretrain-overrides", nargs="*", default=[],
                   help="KEY=VALUE applied to every pretraining run")
    p.add_argument("--finetune-overrides", nargs="*", default=[],
                   help="KEY=VALUE applied to every fine-tuning run")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    a = p.parse_args(argv)

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown} (choose from {', '.join(METHODS)})")
    skipped = {m: f"no preset tiny/{a.variant}/{m} in this build" for m in methods
               if f"tiny/{a.variant}/{m}" not in PRESETS}
    active = [m for m in methods if m not in skipped]
    evals = math.ceil(a.finetune_iters / a.eval_every) if a.eval_every > 0 else 1
    minutes = estimate_minutes(active, len(a.pretrain_seeds), len(a.finetune_seeds),
                               a.pretrain_iters, a.finetune_iters, evals)
    print(f"methods {active} (skipped: {skipped or 'none'}), {a.variant}, pretrain seeds "
          f"{a.pretrain_seeds}, fine-tune seeds {a.finetune_seeds}; estimated {minutes:.0f} min "
          "on 2 cores", flush=True)
    if a.dry_run:
        return

    out: Path = a.out
    configs = out / "configs"
    plan = DemoPlan(n_train=a.n_train, n_val=a.n_val, n_unlabeled=a.n_unlabeled,
                    backbone_steps=a.backbone_steps, pretrain_iters=a.pretrain_iters,
                    finetune_iters=a.finetune_iters, variant=a.variant, seed=a.data_seed)
    make_data(out, plan)
    make_proposals(out)

    def pretrain(method: str, s: int) -> None:
        cfg = pretrain_config(out, plan, method, s, a.pretrain_iters, a.pretrain_overrides)
        _train("pretrain", cfg, "done", configs, mark=True)

    def finetune(name: str, f: int, init: str) -> None:
        cfg = finetune_config(out, plan, init, seed=f)
        cfg = apply_overrides(replace(cfg, output_dir=str(out / "runs" / name)), [
            "engine.progress=false", f"engine.eval_every={a.eval_every}",
            *a.finetune_overrides])
        _train("finetune", cfg, "final_metrics.json", configs)

    def ckpt(method: str, s: int) -> str:
        return str(out / "runs" / f"pre_{method}_s{s}" / "last.pt")

    ft_runs = {("scratch", None, f): f"ft_scratch_f{f}" for f in a.finetune_seeds}
    ft_runs.update({(m, s, f): f"ft_{m}_p{s}_f{f}" for m in active for s in a.pretrain_seeds
                    for f in a.finetune_seeds})
    # phase 1: pretraining runs and scratch fine-tunings; phase 2: fine-tuning from checkpoints
    with ThreadPoolExecutor(a.jobs) as pool:
        jobs = [pool.submit(pretrain, m, s) for m in active for s in a.pretrain_seeds]
        jobs += [pool.submit(finetune, ft_runs[("scratch", None, f)], f, "")
                 for f in a.finetune_seeds]
        for job in jobs:
            job.result()
        jobs = [pool.submit(finetune, name, f, ckpt(m, s))
                for (m, s, f), name in ft_runs.items() if m != "scratch"]
        for job in jobs:
            job.result()

    results: dict[str, dict[RunKey, dict[str, float]]] = {}
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for (m, s, f), name in ft_runs.items():
        run = out / "runs" / name
        results.setdefault(m, {})[(s, f)] = json.loads((run / "final_metrics.json").read_text())
        curves.setdefault(m, []).append(ap_curve(run))
    caption = (f"COCO AP on {a.n_val} held-out toy images; {a.variant} (tiny preset), "
               f"{a.n_train} labeled / {a.n_unlabeled} unlabeled images, pretraining "
               f"{a.pretrain_iters} its (seeds {a.pretrain_seeds}), fine-tuning "
               f"{a.finetune_iters} its (seeds {a.finetune_seeds}).")
    table = markdown_table(summary_rows(results), skipped, results, caption)
    (out / "table.md").write_text(table)
    plot_curves(curves, out / "ap_vs_step.png", caption)
    (out / "summary.json").write_text(json.dumps({
        "args": vars(a), "skipped": skipped,
        "runs": {name: {"init": m, "pretrain_seed": s, "finetune_seed": f,
                        "metrics": results[m][(s, f)], "curve": ap_curve(out / "runs" / name)}
                 for (m, s, f), name in ft_runs.items()}}, indent=1, default=str))
    print(table)
    print(f"wrote {out / 'table.md'}, {out / 'ap_vs_step.png'}, {configs}/")


if __name__ == "__main__":
    main()
