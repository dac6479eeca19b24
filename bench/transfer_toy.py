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

from siamese_detr.config import RunConfig
from siamese_detr.configio import apply_overrides, save_yaml
from siamese_detr.demo import DemoPlan, finetune_config, make_data, make_proposals, pretrain_config


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")


def _train(kind: str, cfg: RunConfig, marker: str) -> None:
    """Run one training job (``cfg.output_dir``) unless its ``marker`` file exists; an
    interrupted job continues from its ``last.pt``."""
    run_dir = Path(cfg.output_dir)
    if (run_dir / marker).is_file():
        return
    cfg_path = run_dir.parent.parent / "configs" / f"{run_dir.name}.yaml"
    save_yaml(cfg, cfg_path)
    cmd = ["siamese-detr", kind, "--preset", cfg.name, "--config", str(cfg_path)]
    if (run_dir / "last.pt").is_file():
        cmd += ["--resume", "auto"]
    else:  # killed before its first checkpoint: start again (a fresh run folder is refused)
        cmd += ["--overwrite"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    _run(cmd, run_dir.with_suffix(".log"))


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

    def run_config(cfg: RunConfig, name: str, seed: int, extra: list[str]) -> RunConfig:
        return apply_overrides(replace(cfg, seed=seed, output_dir=str(out / "runs" / name)),
                               ["engine.progress=false", *extra])

    def pretrain(s: int) -> None:
        name = f"pre_s{s}"
        _train("pretrain", run_config(pretrain_config(out, plan), name, s, a.pretrain_overrides),
               "done")
        (out / "runs" / name / "done").touch()

    def finetune(name: str, f: int, init: str) -> None:
        _train("finetune", run_config(finetune_config(out, plan, init), name, f, []),
               "eval_metrics.json")

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

    scratch = [ap(f"scratch_f{f}") for f in a.finetune_seeds]
    rows = {"scratch": scratch}
    for s in a.pretrain_seeds:
        rows[f"siamese, pretrain seed {s}"] = [ap(f"siam_p{s}_f{f}") for f in a.finetune_seeds]
    siam_rows = [vs for k, vs in rows.items() if k != "scratch"]
    siam_all = [v for vs in siam_rows for v in vs]
    diffs = [v - sc for vs in siam_rows for v, sc in zip(vs, scratch)]

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
    (out / "summary.json").write_text(json.dumps(
        {"args": vars(a), "ap": rows, "paired_diff": diffs}, indent=1, default=str))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
