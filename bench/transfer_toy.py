"""Does Siamese DETR pretraining help fine-tuning at toy scale?  Seeds on both stages.

Builds the demo's toy data (labeled set, unlabeled images, EdgeBoxes proposals and the
label-free photo-id ResNet-18 that stands in for SwAV), then runs

* ``P`` pretraining runs (``--pretrain-seeds``), each fine-tuned with every ``--finetune-seeds``,
* fine-tuning from scratch with the same fine-tuning seeds and budget,

as ``siamese-detr`` subprocesses, ``--jobs`` at a time with one thread each, and prints COCO AP
per run, per-pretraining-run means, the overall mean +- standard deviation and the paired
difference (Siamese init minus scratch, same fine-tuning seed). Every run folder is kept, a
finished run is never re-run, so the script can be stopped and started again.

    python bench/transfer_toy.py --out /tmp/transfer --pretrain-seeds 0 1 2 \
        --finetune-seeds 0 1 2 --pretrain-iters 2000 --n-unlabeled 320 --n-val 64 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from siamese_detr.configio import apply_overrides, save_yaml
from siamese_detr.demo import DemoPlan, finetune_config, make_data, make_proposals, pretrain_config


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")


def _train(kind: str, cfg_path: Path, run_dir: Path, marker: str) -> float:
    """Run one training job unless its ``marker`` file exists; returns seconds spent."""
    if (run_dir / marker).is_file():
        return 0.0
    t0 = time.perf_counter()
    cmd = ["siamese-detr", kind, "--preset", _preset_of(cfg_path), "--config", str(cfg_path)]
    if (run_dir / "last.pt").is_file():
        cmd += ["--resume", "auto"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    _run(cmd, run_dir.with_suffix(".log"))
    return time.perf_counter() - t0


def _preset_of(cfg_path: Path) -> str:
    for line in cfg_path.read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{cfg_path} has no 'name:' line")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", default="deformable")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-iters", type=int, default=800)
    p.add_argument("--finetune-iters", type=int, default=600)
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--n-unlabeled", type=int, default=160)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--backbone-steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--pretrain-overrides", nargs="*", default=[],
                   help="KEY=VALUE applied to every pretraining run")
    a = p.parse_args()

    out: Path = a.out
    plan = DemoPlan(n_train=a.n_train, n_val=a.n_val, n_unlabeled=a.n_unlabeled,
                    backbone_steps=a.backbone_steps, pretrain_iters=a.pretrain_iters,
                    finetune_iters=a.finetune_iters,
                    variant=a.variant, seed=a.data_seed)
    t0 = time.perf_counter()
    make_data(out, plan)
    make_proposals(out)
    print(f"data + proposals ready in {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "configs").mkdir(parents=True, exist_ok=True)

    def pre_cfg(s: int) -> Path:
        cfg = pretrain_config(out, plan)
        cfg = apply_overrides(replace(cfg, seed=s, output_dir=str(out / "runs" / f"pre_s{s}")),
                              ["engine.progress=false", *a.pretrain_overrides])
        path = out / "configs" / f"pre_s{s}.yaml"
        save_yaml(cfg, path)
        return path

    def ft_cfg(name: str, s: int, init: str) -> Path:
        cfg = finetune_config(out, plan, init)
        cfg = apply_overrides(replace(cfg, seed=s, output_dir=str(out / "runs" / name)),
                              ["engine.progress=false"])
        path = out / "configs" / f"{name}.yaml"
        save_yaml(cfg, path)
        return path

    def pretrain(s: int) -> None:
        _train("pretrain", pre_cfg(s), out / "runs" / f"pre_s{s}", "done")
        (out / "runs" / f"pre_s{s}" / "done").touch()

    def finetune(name: str, f: int, init: str) -> None:
        _train("finetune", ft_cfg(name, f, init), out / "runs" / name, "eval_metrics.json")

    # phase 1: every pretraining run and the scratch baselines; phase 2: every fine-tuning
    # from a pretrained checkpoint (so no core idles while one chain fine-tunes in sequence)
    with ThreadPoolExecutor(a.jobs) as pool:
        jobs = [pool.submit(pretrain, s) for s in a.pretrain_seeds]
        jobs += [pool.submit(finetune, f"scratch_f{f}", f, "") for f in a.finetune_seeds]
        for job in jobs:
            job.result()
        jobs = [pool.submit(finetune, f"siam_p{s}_f{f}", f,
                            str(out / "runs" / f"pre_s{s}" / "last.pt"))
                for s in a.pretrain_seeds for f in a.finetune_seeds]
        for job in jobs:
            job.result()

    def ap(name: str) -> float:
        m = json.loads((out / "runs" / name / "eval_metrics.json").read_text())
        return 100 * m["coco/AP"]

    rows = {"scratch": [ap(f"scratch_f{f}") for f in a.finetune_seeds]}
    for s in a.pretrain_seeds:
        rows[f"siamese, pretrain seed {s}"] = [ap(f"siam_p{s}_f{f}") for f in a.finetune_seeds]
    siam_all = [v for k, vs in rows.items() if k != "scratch" for v in vs]
    diffs = [ap(f"siam_p{s}_f{f}") - ap(f"scratch_f{f}")
             for s in a.pretrain_seeds for f in a.finetune_seeds]

    def ms(xs: list[float]) -> str:
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):5.1f} +- {sd:4.1f}"

    seeds = " | ".join(f"ft seed {f}" for f in a.finetune_seeds)
    print(f"\nCOCO AP@[.5:.95] (%) on {a.n_val} held-out images, {a.n_train} labeled, "
          f"{a.n_unlabeled} unlabeled, pretrain {a.pretrain_iters} its, "
          f"fine-tune {a.finetune_iters} its, {a.variant}")
    print(f"| init | {seeds} | mean +- sd |")
    print("|---" * (len(a.finetune_seeds) + 2) + "|")
    for k, vs in rows.items():
        print(f"| {k} | " + " | ".join(f"{v:.1f}" for v in vs) + f" | {ms(vs)} |")
    print(f"\nsiamese, all {len(siam_all)} runs: {ms(siam_all)}   scratch: {ms(rows['scratch'])}")
    wins = sum(d > 0 for d in diffs)
    print(f"paired difference (siamese - scratch, same fine-tuning seed): {ms(diffs)}, "
          f"wins {wins}/{len(diffs)}")
    (out / "summary.json").write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path)
                                                               else v) for k, v in vars(a).items()},
                                                  "ap": rows, "paired_diff": diffs}, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
