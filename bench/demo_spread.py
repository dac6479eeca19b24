"""How much the demo's numbers move: ``siamese-detr demo`` repeated at several thread counts.

Each run is a fresh ``siamese-detr demo --out OUT/t<threads>[_<isa>]_r<repeat>`` subprocess
with ``OMP_NUM_THREADS=<threads>`` (the thread count changes the CPU kernels' reduction order,
as a different machine does; the fine-tuning runs inside the demo always use one thread each).
``--isa avx2`` also caps torch's kernels at AVX2 (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``) on an AVX-512 machine: the numerics of a CPU without AVX-512.
``--jobs`` demos run side by side: the AP numbers do not depend on it, the wall times do, so
take timings from ``--jobs 1`` runs only. A finished run is not run again.

Writes ``OUT/spread.md`` (one row per run, then mean ± sd over runs of each arm's AP) and
``OUT/spread.json``, prints both, and exits 1 if any run's mean AP leaves the band the README
states (:data:`siamese_detr.demo.demo.EXPECTED_AP`).

    python bench/demo_spread.py --out /tmp/spread --threads 1 2 --repeats 2 --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from siamese_detr.demo.demo import EXPECTED_AP, within_band
from siamese_detr.files import write_json, write_text

ARMS = ("scratch", "siamese")


def run_demo(out: Path, threads: int, extra: list[str], isa: str | None = None,
             shared: bool = False) -> dict[str, Any]:
    """One demo run (skipped when its ``spread_run.json`` exists); its results and wall time."""
    record = out / "spread_run.json"
    if record.is_file():
        return json.loads(record.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if isa:
        env.update(ATEN_CPU_CAPABILITY=isa.lower(), ONEDNN_MAX_CPU_ISA=isa.upper())
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{out.name}.log").open("a") as log:
        rc = subprocess.call([sys.executable, "-m", "siamese_detr", "demo", "--out", str(out),
                              *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"demo {out} failed with exit code {rc}; see {out.parent / out.name}.log")
    results = json.loads((out / "results.json").read_text())
    # the largest resident set of any process waited for so far (the demo and its fine-tuning
    # subprocesses; with --jobs > 1 the maximum over all runs until now)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    rec = {"threads": threads, "isa": isa or "native", "seconds": time.perf_counter() - t0,
           "peak_rss_gib": peak, "shared": shared, "results": results}
    write_json(record, rec, indent=2)
    return rec


def summarize(runs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = ["| run | threads | CPU kernels | wall (min) | scratch AP per seed | scratch AP | "
             "Siamese AP per seed | Siamese AP | gain (wins) | in band |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    means: dict[str, list[float]] = {arm: [] for arm in ARMS}
    gains: list[float] = []
    ok = True
    for name, rec in runs.items():
        res = rec["results"]
        cells = []
        for arm in ARMS:
            per_seed = [100 * m["coco/AP"] for m in res[arm]["runs"].values()]
            mean = 100 * res[arm]["mean"]["coco/AP"]
            means[arm].append(mean)
            cells += [" ".join(f"{v:.1f}" for v in per_seed),
                      f"{mean:.1f} ± {100 * res[arm]['sd']['coco/AP']:.1f}"]
        g = res["gain"]["coco/AP"]
        gains.append(100 * g["mean"])
        inside = within_band(res)
        ok &= not inside
        wall = f"{rec['seconds'] / 60:.1f}" + (" (shared)" if rec.get("shared") else "")
        lines.append(f"| {name} | {rec['threads']} | {rec.get('isa', 'native')} | {wall} | "
                     + " | ".join(cells) + f" | {100 * g['mean']:+.1f} ({g['wins']}/{g['pairs']})"
                     f" | {'yes' if not inside else 'NO: ' + '; '.join(inside)} |")
    summary: dict[str, Any] = {}
    lines.append("")
    for arm, values in [*means.items(), ("gain", gains)]:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[arm] = {"mean": statistics.mean(values), "sd": sd, "min": min(values),
                        "max": max(values), "n": len(values)}
        lines.append(f"- {arm}: mean AP over runs {statistics.mean(values):.1f} ± {sd:.1f} "
                     f"(min {min(values):.1f}, max {max(values):.1f}, {len(values)} runs)")
    lines.append(f"- band (README): {json.dumps(EXPECTED_AP)}; every run inside: "
                 f"{'yes' if ok else 'NO'}")
    summary["all_in_band"] = ok
    return "\n".join(lines) + "\n", summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="demos side by side (timings: use 1; "
                   "a run's record gets \"shared\": true when its wall time is not its own)")
    p.add_argument("--isa", default=None, choices=["avx2", "default"],
                   help="cap torch's CPU kernels (default: the machine's best)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run and report only these of the t<threads>_r<repeat> runs")
    p.add_argument("demo_args", nargs="*", help="passed to `siamese-detr demo` (after --)")
    a = p.parse_args()
    tag = f"_{a.isa}" if a.isa else ""
    names = {f"t{t}{tag}_r{r}": t for r in range(a.repeats) for t in a.threads}
    if a.only:
        names = {n: t for n, t in names.items() if n in a.only}
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = {n: pool.submit(run_demo, a.out / n, t, a.demo_args, a.isa, a.jobs > 1)
                   for n, t in names.items()}
        runs = {n: f.result() for n, f in futures.items()}
    # every finished run in OUT joins the table (runs of other invocations too)
    for record in sorted(a.out.glob("*/spread_run.json")):
        runs.setdefault(record.parent.name, json.loads(record.read_text()))
    table, summary = summarize(runs)
    write_text(a.out / "spread.md", table)
    write_json(a.out / "spread.json", {"runs": runs, "summary": summary}, indent=2)
    print(table)
    return 0 if summary["all_in_band"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
