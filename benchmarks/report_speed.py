"""How long the report stage takes on a big study: target under 10 s for 500 trial runs on 2 cores.

    python benchmarks/report_speed.py                        # 500 trials, 3 repeats, median
    python benchmarks/report_speed.py --trials 100 --repeats 1
    python benchmarks/report_speed.py --profile              # and cProfile one in-process run

In a temporary folder (working directory and MLflow SQLite store), a synthetic study is written
straight into the store with ``MlflowClient`` (``tests/report_fixtures.py``, the builder the tests
use: a study run and N nested trial runs with every training setting as params, per-epoch step
metrics, final metrics, FINISHED / KILLED / FAILED statuses, the best trial's artifacts; no
training). Then, per repeat, each in a fresh interpreter:

- (a) ``make_report`` in-process: after the imports, the call that extracts, renders, writes and
  logs the report, with a breakdown of where its time went (wrapped calls, exclusive of nothing:
  figure building and PNG rendering are shown apart);
- (b) the whole command ``python -m pipeline.report --study NAME``, interpreter start and imports
  included, timed from outside.

Wall time is what a user waits; CPU time (own process) barely moves when other processes take the
cores, so both are printed with the load from other processes during the run.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

TARGET_S = 10.0
TESTS = _bench.REPO / "tests"


def build(folder: Path, n_trials: int, key: str) -> float:
    """Write the synthetic study; returns seconds. SQLite's fsync per commit is switched off
    while building only (it made building 3x slower on this disk); the timed runs below open
    their own store with MLflow's defaults."""
    sys.path.insert(0, str(TESTS))
    from mlflow.tracking import MlflowClient
    from report_fixtures import build_study, synthetic_trials
    from sqlalchemy import event

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    client.search_experiments()  # creates the schema
    engine = client._tracking_client.store.engine  # a benchmark may reach in; the tests do not

    def unsynced(connection, _record):
        connection.execute("PRAGMA synchronous=OFF")

    event.listen(engine, "connect", unsynced)
    engine.dispose()
    t0 = time.perf_counter()
    build_study(client, key, synthetic_trials(n_trials), folder=folder)
    seconds = time.perf_counter() - t0
    event.remove(engine, "connect", unsynced)
    engine.dispose()
    return seconds


# -- (a) in-process, in a fresh interpreter -----------------------------------------------------

FIGURES = ("history", "objective_vs_params", "pair", "parallel_coordinates", "importance",
           "top_curves", "lr_schedule", "generalisation", "confusion", "misclassified",
           "grad_norms", "compare_objectives")


def inner(key: str, profile: str | None) -> None:
    """Import, then time make_report; prints one JSON line."""
    t0, c0 = time.perf_counter(), time.process_time()
    import optuna  # noqa: F401  (imported inside the report's functions)
    import torch  # noqa: F401  (the dataset, for the baseline row and misclassified examples)

    from pipeline import figures
    from pipeline.report import build as report, extract as rd, figures as rf
    from pipeline.tracking import client as tracking

    imports = time.perf_counter() - t0
    phases: dict[str, float] = {}

    def timed(module, name, label):
        func = getattr(module, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapper)

    timed(rd, "extract_study", "extract (MLflow queries, artifacts)")
    timed(report, "_compute_importance", "importance (fANOVA)")
    for name in FIGURES:
        timed(rf, name, "figures: build")
    timed(figures, "to_png", "figures: render PNG")
    timed(report, "write_report", "write folder (HTML, Markdown, CSV)")
    t_open = time.perf_counter()
    client = tracking.tracking_client()
    tracking.check_store(client)  # as the command does; opening a SQLite store checks its schema
    open_store = time.perf_counter() - t_open
    timed(client, "log_artifacts", "log to MLflow")
    t1, c1 = time.perf_counter(), time.process_time()
    if profile:
        import cProfile

        cProfile.runctx("report.make_report(client, [key], Path('reports'))", globals(),
                        locals(), profile)
    else:
        report.make_report(client, [key], Path("reports"))
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    phases["other"] = wall - sum(phases.values())
    print(json.dumps({"imports": imports, "open_store": open_store, "wall": wall, "cpu": cpu,
                      "phases": phases}))


def run_inner(key: str, profile: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--inner", key] + (["--profile-to", profile] if profile
                                                        else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- (b) the command ------------------------------------------------------------------------------


def run_command(key: str) -> tuple[float, float]:
    """Wall and CPU seconds of ``python -m pipeline.report --study KEY``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", "--study", key],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the report failed ({proc.returncode}):\n{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also run (a) once under cProfile and print the top functions")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        inner(args.inner, args.profile_to)
        return 0

    key = f"bench-{args.trials}"
    with _bench.workspace("report-speed-", keep=args.keep) as tmp:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_bench.REPO), os.environ.get("PYTHONPATH")) if p)
        print(f"building {args.trials} trial runs in {tmp} ...", flush=True)
        print(f"built in {build(tmp, args.trials, key):.1f} s (not timed below)\n", flush=True)
        rows = []
        for i in range(args.repeats):
            with _bench.CpuMeter() as meter_a:
                a = run_inner(key)
            with _bench.CpuMeter() as meter_b:
                b_wall, b_cpu = run_command(key)
            rows.append({"a": a, "b_wall": b_wall, "b_cpu": b_cpu})
            print(f"repeat {i + 1}: (a) make_report {a['wall']:.2f} s wall / {a['cpu']:.2f} s CPU"
                  f" (before it: imports {a['imports']:.2f} s, opening the store "
                  f"{a['open_store']:.2f} s); {meter_a.describe()}")
            print(f"          (b) command {b_wall:.2f} s wall / {b_cpu:.2f} s CPU; "
                  f"{meter_b.describe()}", flush=True)

        med = {k: statistics.median(v) for k, v in {
            "a_wall": [r["a"]["wall"] for r in rows], "a_cpu": [r["a"]["cpu"] for r in rows],
            "imports": [r["a"]["imports"] for r in rows],
            "open_store": [r["a"]["open_store"] for r in rows],
            "b_wall": [r["b_wall"] for r in rows], "b_cpu": [r["b_cpu"] for r in rows]}.items()}
        print(f"\nmedian of {args.repeats}, {args.trials} trial runs (target {TARGET_S:.0f} s):")
        print("| what | wall (s) | CPU (s) | wall / target |")
        print("|---|---|---|---|")
        print(f"| (a) make_report in-process | {med['a_wall']:.2f} | {med['a_cpu']:.2f} | "
              f"{med['a_wall'] / TARGET_S:.2f} |")
        print(f"| (b) python -m pipeline.report | {med['b_wall']:.2f} | {med['b_cpu']:.2f} | "
              f"{med['b_wall'] / TARGET_S:.2f} |")
        print(f"| before (a): imports | {med['imports']:.2f} | | |")
        print(f"| before (a): opening the store | {med['open_store']:.2f} | | |")
        phases = {k: statistics.median(r["a"]["phases"].get(k, 0.0) for r in rows)
                  for k in rows[0]["a"]["phases"]}
        print("\nwhere (a)'s time went (median seconds):")
        for name, sec in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"  {sec:6.2f}  {name}")
        verdict = "met" if med["b_wall"] < TARGET_S else "MISSED"
        print(f"\ntarget {verdict}: the command took {med['b_wall']:.2f} s "
              f"({med['b_wall'] / TARGET_S:.2f}x the {TARGET_S:.0f} s target)")
        if args.profile:
            import pstats

            prof = str(tmp / "report.prof")
            run_inner(key, prof)
            print("\ncProfile of one in-process make_report (top 30 by cumulative time):")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
