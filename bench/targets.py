"""Issue 13's GPU targets, read from what the device scripts wrote: one verdict per target.

    python bench/targets.py OUT [OUT ...]        # folders (or files) of the gpu_*.sh results

Reads every ``bench_gpu.py`` result (``*.json`` with ``rows``) and the loader lines of the logs
(``*.log``: ``NAME ... | loader with N workers X samples/s``). Step times are compared only
within one result file: two device calls may land on two machines of the same kind whose
speeds differ (docs/benchmarks.md section 2). Targets (issue 13, acceptance):

* ``hf``: each detector's fine-tuning step at least 1.3x faster than ``transformers``, fp32 and
  bf16 (our eager step, and our fastest: eager, compiled or graphed);
* ``bf16``: bf16 at least 1.3x faster than fp32, per step kind (eager fine-tuning, graphed
  fine-tuning, ...) and fastest bf16 against fastest fp32;
* ``pretrain``: the pretraining step at most 1.5x the fine-tuning step of the same detector,
  batch, size and precision (eager against eager, graphed against graphed, and graphed with
  the same backbone options: ``*_graphed_fused``, ``*_graphed_cl_fused``);
* ``loader``: the pretraining loader (``augment on device`` rows) at least 4x the GPU's demand:
  the fastest pretraining step's images/s at the presets' per-GPU batch (at least 4), graphed
  steps included, when both are in the inputs.

Each line says PASS or MISS with the figure; a target with no figure says so.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HF_MIN, BF16_MIN, PRETRAIN_MAX, LOADER_MIN = 1.3, 1.3, 1.5, 4.0
FINETUNE = ("ours", "ours_compiled", "ours_graphed")
PRETRAIN = ("pretrain", "pretrain_graphed", "pretrain_aug", "pretrain_aug_graphed")
# the pretrain target's (pretraining row, fine-tuning row) pairs: eager with eager, graphed
# with graphed, and both steps with the same backbone options (fused_conv_relu, channels_last)
PRETRAIN_PAIRS = (("pretrain", "ours"), ("pretrain_graphed", "ours_graphed"),
                  ("pretrain_aug", "ours"), ("pretrain_aug_graphed", "ours_graphed"),
                  ("pretrain_graphed_fused", "ours_graphed_fused"),
                  ("pretrain_graphed_cl_fused", "ours_graphed_cl_fused"))
LOADER_LINE = re.compile(r"^(?P<name>.+?)\s+[\d.]+ samples/s per worker.*\| loader with "
                         r"(?P<workers>\d+) workers\s+(?P<rate>[\d.]+) samples/s")


@dataclass(frozen=True)
class Verdict:
    target: str
    what: str
    value: float
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        return f"{verdict}  {self.target:8s} {self.what}: {self.value:.2f}"


STEP_ROW = {"variant", "dtype", "impl", "ms_median"}  # what a bench_gpu.py row holds


def _key(r: dict[str, Any]) -> tuple[str, int, tuple[int, ...]]:
    return r["variant"], int(r.get("batch", 0)), tuple(r.get("size", ()))


def _ms(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], float]:
    """(variant, batch, size, dtype, impl) -> median ms."""
    return {(*_key(r), r["dtype"], r["impl"]): float(r["ms_median"]) for r in rows}


def _where(variant: str, batch: int, size: tuple[int, ...]) -> str:
    return f"{variant}, batch {batch} at {'x'.join(map(str, size))}"


def step_targets(rows: list[dict[str, Any]], source: str) -> list[Verdict]:
    """The ``hf``, ``bf16`` and ``pretrain`` verdicts of one result file's rows."""
    ms = _ms(rows)
    out: list[Verdict] = []
    places = sorted({k[:3] for k in ms})
    for variant, batch, size in places:
        at = (variant, batch, size)
        where = f"{_where(variant, batch, size)} [{source}]"
        # every fine-tuning step measured here, per precision: eager, compiled, graphed
        fastest = {d: [v for k, v in ms.items() if k[:4] == (*at, d) and k[4] in FINETUNE]
                   for d in ("fp32", "bf16")}
        for dtype in ("fp32", "bf16"):
            hf = ms.get((*at, dtype, "hf"))
            ours = ms.get((*at, dtype, "ours"))
            if hf is not None and ours is not None:
                out.append(Verdict("hf", f"HF / ours eager, {dtype}, {where}", hf / ours,
                                   hf / ours >= HF_MIN))
                best = min(fastest[dtype])
                if best < ours:
                    out.append(Verdict("hf", f"HF / ours fastest, {dtype}, {where}", hf / best,
                                       hf / best >= HF_MIN))
        for impl in (*FINETUNE, *PRETRAIN):
            fp32, bf16 = ms.get((*at, "fp32", impl)), ms.get((*at, "bf16", impl))
            if fp32 is not None and bf16 is not None:
                out.append(Verdict("bf16", f"{impl} fp32 / bf16, {where}", fp32 / bf16,
                                   fp32 / bf16 >= BF16_MIN))
        if all(fastest.values()) and len(fastest["fp32"]) + len(fastest["bf16"]) > 2:
            ratio = min(fastest["fp32"]) / min(fastest["bf16"])
            out.append(Verdict("bf16", f"fastest fine-tuning fp32 / fastest bf16, {where}", ratio,
                               ratio >= BF16_MIN))
        for dtype in ("fp32", "bf16"):
            for pre, fine in PRETRAIN_PAIRS:
                p, f = ms.get((*at, dtype, pre)), ms.get((*at, dtype, fine))
                if p is not None and f is not None:
                    out.append(Verdict("pretrain", f"{pre} / {fine}, {dtype}, {where}", p / f,
                                       p / f <= PRETRAIN_MAX))
    return out


def loader_rates(text: str) -> list[tuple[str, int, float]]:
    """``(row name, workers, samples/s)`` of every loader line in a bench_loader log."""
    found = []
    for line in text.splitlines():
        m = LOADER_LINE.match(line.strip())
        if m:
            found.append((m["name"].strip(), int(m["workers"]), float(m["rate"])))
    return found


def loader_targets(rates: list[tuple[str, int, float]], rows: list[dict[str, Any]]
                   ) -> list[Verdict]:
    """The ``loader`` verdicts: each ``augment on device`` Siamese loader rate against the
    fastest Siamese pretraining step's images/s at the presets' per-GPU batch (8, or 4 for
    Deformable DETR; smaller batches are left out): the GPU's demand."""
    demand = [float(r["images_per_s"]) for r in rows
              if r["impl"] in PRETRAIN and int(r.get("batch", 0)) >= 4 and r.get("images_per_s")]
    if not demand:
        return []
    need = max(demand)
    return [Verdict("loader", f"loader / GPU demand ({need:.0f} img/s), {name}, {w} workers",
                    rate / need, rate / need >= LOADER_MIN)
            for name, w, rate in rates
            if name.startswith("pretrain/paper, augment on device") and "copied" not in name]


def collect(paths: list[Path]) -> tuple[list[tuple[str, list[dict[str, Any]]]], str]:
    """(result files with their rows, all log text) under ``paths``."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.rglob("*")) if p.is_dir() else [p]
    results, logs = [], []
    for f in files:
        if f.suffix == ".json":
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            rows = data.get("rows") if isinstance(data, dict) else None
            # bench_gpu.py's rows are a list of step timings; other benches keep a dict
            # (bench_phases.py) or rows of another kind (bench_deform_bwd.py's settings)
            if isinstance(rows, list):
                rows = [r for r in rows if isinstance(r, dict) and r.keys() >= STEP_ROW]
                if rows:
                    results.append((f.name, rows))
        elif f.suffix == ".log":
            logs.append(f.read_text(errors="replace"))
    return results, "\n".join(logs)


def per_view(rows: list[dict[str, Any]], source: str) -> list[str]:
    """Not a target: the pretraining step per encoded image against the fine-tuning step per
    image (a pretraining step encodes two views of each image), for each graphed pair of the
    ``pretrain`` target. Session 8 proposed stating that target this way for Deformable DETR,
    whose step is mostly its encoder."""
    ms, out = _ms(rows), []
    graphed = {pre: fine for pre, fine in PRETRAIN_PAIRS if "graphed" in pre}
    for (variant, batch, size, dtype, impl), p in sorted(ms.items()):
        fine = graphed.get(impl)
        f = ms.get((variant, batch, size, dtype, fine)) if fine else None
        if f is not None:
            out.append(f"INFO  per-view {impl} / 2 / {fine}, {dtype}, "
                       f"{_where(variant, batch, size)} [{source}]: {p / 2 / f:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="result folders or files")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"targets: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    results, logs = collect(args.paths)
    verdicts: list[Verdict] = []
    for name, rows in results:
        verdicts += step_targets(rows, name)
    verdicts += loader_targets(loader_rates(logs), [r for _, rows in results for r in rows])
    for target in ("hf", "bf16", "pretrain", "loader"):
        mine = [v for v in verdicts if v.target == target]
        for v in mine:
            print(v.line())
        if not mine:
            print(f"----  {target:8s} no figure in these results")
    for name, rows in results:
        for line in per_view(rows, name):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
