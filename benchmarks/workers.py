"""``--workers auto`` (the default) against one worker: wall time and CPU utilisation.

    python benchmarks/workers.py                                  # digits coarse, 3 repeats
    python benchmarks/workers.py --dataset fashion-mnist --n-per-class 1000 --n-trials 12
    python benchmarks/workers.py --sides 1,auto,2 --repeats 5

Each repeat runs ``python -m pipeline.search --study coarse`` once per side, in order rotated
each repeat, each in a fresh temporary folder (its own ``optuna.journal`` and MLflow SQLite store),
timed from before the interpreter starts to its exit. CPU utilisation is the CPU seconds the
command and all its processes used divided by wall time times the usable cores. Printed: per side
the median wall time and utilisation, and the median of the per-repeat ratios side / one worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402


def study_file(tmp: Path, dataset: str, n_per_class: int | None, n_trials: int | None) -> Path:
    """The shipped coarse study, on ``dataset``, optionally on a class-balanced subset."""
    cfg = yaml.safe_load((_bench.STUDIES / "coarse.yaml").read_text())
    cfg["dataset"] = dataset
    if n_per_class:
        cfg["fixed"]["n_per_class"] = n_per_class
    if n_trials:
        cfg["n_trials"] = n_trials
    path = tmp / "coarse.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def one(side: str, args) -> dict:
    with _bench.workspace("bench-workers-") as tmp:
        path = study_file(tmp, args.dataset, args.n_per_class, args.n_trials)
        with _bench.CpuMeter() as cpu:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pipeline.search", "--study", str(path),
                                   "--workers", side, "--quiet"],
                                  capture_output=True, text=True, cwd=tmp, env=dict(os.environ))
            wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"{side}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        summary = [line for line in proc.stdout.splitlines() if "complete," in line]
        return {"wall": wall, "util": cpu.own_cores / _bench_cores(), "other": cpu.other_cores,
                "summary": summary[-1] if summary else ""}


def _bench_cores() -> int:
    return len(os.sched_getaffinity(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    p.add_argument("--n-per-class", type=int, default=None)
    p.add_argument("--n-trials", type=int, default=None)
    p.add_argument("--sides", default="1,auto")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sides = args.sides.split(",")
    print(_bench.code_state())
    print(f"coarse study on {args.dataset}, n_per_class {args.n_per_class or 'all'}, n_trials "
          f"{args.n_trials or 'as shipped'}; {_bench_cores()} usable cores; {args.repeats} repeats")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for side in order:
            res = one(side, args)
            results[side].append(res)
            print(f"  repeat {r} --workers {side:>4}: {res['wall']:6.1f} s, CPU "
                  f"{res['util']:.0%} of all cores (others {res['other']:.2f} cores)  "
                  f"{res['summary']}", flush=True)
    base = results[sides[0]]
    print(f"\n| --workers | wall s (median) | CPU use of all cores (median) | wall / --workers "
          f"{sides[0]} (median of per-repeat ratios) |\n|---|---:|---:|---:|")
    for side in sides:
        walls = [x["wall"] for x in results[side]]
        ratios = [x["wall"] / b["wall"] for x, b in zip(results[side], base, strict=True)]
        print(f"| {side} | {statistics.median(walls):.1f} | "
              f"{statistics.median(x['util'] for x in results[side]):.0%} | "
              f"{statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
