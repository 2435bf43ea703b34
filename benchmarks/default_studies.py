"""The quickstart's two commands, timed as a user runs them, against the project's targets.

    python benchmarks/default_studies.py                    # as shipped
    python benchmarks/default_studies.py --omp-threads 1    # the same with OMP_NUM_THREADS=1
    python benchmarks/default_studies.py --omp-threads 1 --proposals   # and the patches below
    python benchmarks/default_studies.py --repeats 3 --keep

In a fresh temporary folder (its working directory, ``optuna.journal`` and an MLflow SQLite store
there), ``python -m pipeline.search --study coarse`` and then ``--study fine`` run as subprocesses
with their defaults (the embedded digits dataset). Targets:

- both stages together, process start-up included, in under 2 minutes on 2 cores;
- the best fine trial (chosen on validation) reaches test accuracy >= 0.97;
- orchestration overhead at most 5 % of a trial's wall time. A single worker runs its trials back
  to back, so trial k's loop time is ``datetime_complete[k] - datetime_complete[k-1]`` (the first:
  ``datetime_complete - datetime_start``) and its overhead is that minus its ``train_seconds``.
  The stage's share is ``1 - sum(train_seconds) / sum(loop time)``; the mean per-trial share is
  also shown. Time outside the worker loop (interpreter start-up, imports, opening stores,
  narrowing, the study run's summary and best-model export) is shown in its own column.

``--proposals`` puts ``benchmarks/proposals`` on the studies' PYTHONPATH: its ``sitecustomize``
applies the changes proposed in benchmarks/README.md (journal appends without fsync, MLflow's
SQLite in WAL mode, ``pipeline.figures`` imported lazily) to those processes only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

TARGET_SECONDS = 120.0
TARGET_TEST_ACC = 0.97
TARGET_OVERHEAD = 0.05
STAGES = ("coarse", "fine")
PROPOSALS = Path(__file__).resolve().parent / "proposals"


def run_stage(study: str, tmp: Path, env: dict) -> dict:
    """One `python -m pipeline.search --study NAME`, timed from before the interpreter starts."""
    log = tmp / f"{study}.log"
    with open(log, "w") as out, _bench.CpuMeter() as cpu:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.search", "--study", study],
                              cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stdout.write(log.read_text()[-3000:])
        raise SystemExit(f"{study}: exit code {proc.returncode}")
    summary = [line for line in log.read_text().splitlines() if line.startswith(f"[{study}]")]
    return {"wall": wall, "cpu": cpu, "summary": summary}


def one_repeat(args) -> dict:
    import optuna

    with tempfile.TemporaryDirectory(prefix="bench-default-") as tmp_name:
        tmp = Path(tmp_name)
        env = _bench.workspace_env(tmp)
        if args.omp_threads:
            env["OMP_NUM_THREADS"] = str(args.omp_threads)
        if args.proposals:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(PROPOSALS)] + [p for p in [env.get("PYTHONPATH")] if p])
        stages = {s: run_stage(s, tmp, env) for s in STAGES}
        storage = _bench.open_journal(tmp / "optuna.journal")
        for name, stage in stages.items():
            study = optuna.load_study(study_name=name, storage=storage)
            trials = _bench.finished_trials(study)
            rows = _bench.trial_overheads(trials)
            stage |= {"rows": rows, "ov": _bench.overhead_summary(rows),
                      "n_complete": sum(t.state.name == "COMPLETE" for t in trials),
                      "n_pruned": sum(t.state.name == "PRUNED" for t in trials)}
            if name == "fine":
                best = study.best_trial
                stage["best"] = {"number": best.number, "val_acc": best.value,
                                 "test_acc": best.user_attrs["test_acc"],
                                 "params": best.params}
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="bench-default-kept-"))
            shutil.copytree(tmp, kept, dirs_exist_ok=True)
            print(f"(workspace copied to {kept})")
    return stages


def print_repeat(i: int, stages: dict, omp_threads: int | None, proposals: bool) -> None:
    total = sum(s["wall"] for s in stages.values())
    print(f"\nrepeat {i + 1}: digits (default), 1 worker, "
          f"OMP_NUM_THREADS={omp_threads or 'unset'}"
          f"{', with benchmarks/proposals patches' if proposals else ''}\n")
    print("| stage | wall s | trials (complete / pruned) | epochs | sum train_seconds | "
          "worker loop s | outside loop s | overhead share of loop | mean per-trial overhead "
          "% | median per-trial overhead ms | other processes' CPU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, s in stages.items():
        ov = s["ov"]
        epochs = sum(r["epochs"] for r in s["rows"])
        print(f"| {name} | {s['wall']:.1f} | {ov['n']} ({s['n_complete']} / {s['n_pruned']}) | "
              f"{epochs} | {ov['train']:.1f} | {ov['loop']:.1f} | {s['wall'] - ov['loop']:.1f} | "
              f"{ov['share'] * 100:.1f} % | {ov['mean_share'] * 100:.1f} % | "
              f"{ov['median_ms']:.0f} | {s['cpu'].other_cores:.2f} cores |")
    print(f"| total | {total:.1f} | | | | | | | | | |")
    best = stages["fine"]["best"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in best["params"].items())
    print(f"\nbest fine trial {best['number']}: val acc {best['val_acc']:.4f}, test acc "
          f"{best['test_acc']:.4f} ({params})")
    for name, s in stages.items():
        print(f"  {name}: {s['cpu'].describe()}")
    worst_share = max(s["ov"]["share"] for s in stages.values())
    worst_mean = max(s["ov"]["mean_share"] for s in stages.values())
    print(f"\n{'PASS' if total < TARGET_SECONDS else 'FAIL'}  coarse + fine wall time "
          f"{total:.1f} s (target < {TARGET_SECONDS:.0f} s)")
    print(f"{'PASS' if best['test_acc'] >= TARGET_TEST_ACC else 'FAIL'}  best fine trial's test "
          f"acc {best['test_acc']:.4f} (target >= {TARGET_TEST_ACC})")
    print(f"{'PASS' if worst_mean <= TARGET_OVERHEAD else 'FAIL'}  orchestration overhead: mean "
          f"per-trial share {worst_mean * 100:.1f} % in the worse stage, aggregate "
          f"{worst_share * 100:.1f} % (target <= {TARGET_OVERHEAD * 100:.0f} %)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="fresh coarse + fine runs")
    parser.add_argument("--omp-threads", type=int, default=None,
                        help="set OMP_NUM_THREADS for the studies (default: leave it unset)")
    parser.add_argument("--proposals", action="store_true",
                        help="apply benchmarks/proposals/patches.py to the studies' processes")
    parser.add_argument("--keep", action="store_true", help="keep a copy of each workspace")
    parser.add_argument("--show-trials", action="store_true",
                        help="print every trial's loop, train and overhead seconds")
    args = parser.parse_args(argv)

    print(f"python {sys.version.split()[0]}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    print(_bench.code_state())
    totals = []
    for i in range(args.repeats):
        stages = one_repeat(args)
        print_repeat(i, stages, args.omp_threads, args.proposals)
        for name, s in stages.items():
            print("\n".join(f"  {line}" for line in s["summary"]))
            if args.show_trials:
                for r in s["rows"]:
                    print(f"    {name} trial {r['number']:3d} {r['state']:8s} epochs "
                          f"{r['epochs']:2d} loop {r['loop']:7.3f} s train {r['train']:7.3f} s "
                          f"overhead {r['overhead'] * 1000:6.0f} ms")
        totals.append(sum(s["wall"] for s in stages.values()))
    if args.repeats > 1:
        print(f"\ntotal wall time over {args.repeats} repeats: "
              f"{', '.join(f'{t:.1f}' for t in totals)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
