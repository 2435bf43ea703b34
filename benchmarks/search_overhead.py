"""Orchestration overhead of the search (everything outside training) and how it grows.

    python benchmarks/search_overhead.py                      # default studies + 2 x 310 trials
    python benchmarks/search_overhead.py --n-trials 120 --early 5:15 --late 105:115
    python benchmarks/search_overhead.py --skip-default --profile tpe   # cProfile one long run
    python benchmarks/search_overhead.py --tmp-root /dev/shm  # stores on tmpfs: fsync is free
    python benchmarks/search_overhead.py --journal-fsync off --sqlite-sync wal   # proposals

Everything runs in one process through ``pipeline.search.engine.run_study`` in a temporary folder
(working directory, ``optuna.journal``, MLflow SQLite store); the trial lines go to a log file
there.

- Part 1, the default studies: ``coarse`` then ``fine`` as shipped (digits).
- Part 2, long studies: temporary study files copied from ``studies/coarse.yaml`` with a tiny
  fixed training budget (``width: 16``, ``step_size_epochs: 1``, ``cycles: 2``: 4 epochs, so the
  coarse study's median pruner, whose warm-up is 4 epochs, still judges every trial). One keeps the
  coarse study's sampler (QMC), the other takes ``studies/fine.yaml``'s sampler (TPE, whose
  sampling cost grows with the number of trials); both keep the coarse study's pruner.

Per-trial overhead (a single worker runs trials back to back): loop time of trial k =
``datetime_complete[k] - datetime_complete[k-1]`` (the first: ``- datetime_start``), overhead =
loop time - ``train_seconds``. Growth target: median overhead of trials 295-305 at most 2x that of
trials 5-15.

The breakdown times the calls the worker loop makes (by wrapping them for the run; a few
microseconds per call) with exclusive accounting, so nested calls are not counted twice:
claiming (the lock and counting trials), ``study.ask`` (relative sampling), ``space.suggest``,
the pruner (``trial.report`` / ``should_prune``), ``trial.set_user_attr``, ``study.tell``, each
MLflow write in ``pipeline.tracking``, and building the artifact files. "other" is overhead not
inside any of them (building the config, printing the trial line, the loop itself). Next to
the wall-clock overhead, the main thread's CPU time outside train() is shown: it hardly moves
when other processes take the cores, and the gap between the two is waiting (for a core, or for
fsync: the Optuna journal and MLflow's SQLite store sync every write).

``--journal-fsync off`` and ``--sqlite-sync wal`` try out proposed changes by patching this process
only (Optuna's journal appends without ``os.fsync``; a SQLAlchemy connect hook that puts MLflow's
SQLite store in WAL mode with ``synchronous=NORMAL``); the pipeline's files are not touched.

Training runs on ``--torch-threads`` threads (default 1): training time is not what is measured
here, and on a shared 2-core machine two threads made even the tiny model crawl.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

TARGET_GROWTH = 2.0
TINY_FIXED = {"width": 16, "step_size_epochs": 1, "cycles": 2}


class CallTimer:
    """Exclusive wall and main-thread CPU time per category, bucketed per trial (a bucket closes
    when study.tell returns). Single-threaded use only: the worker loop of one process.

    CPU time (``time.thread_time``) barely moves when other processes take the cores, so it
    separates real growth from the noise of a shared machine.
    """

    def __init__(self):
        self.buckets: list[dict] = [self._bucket()]
        self._stack: list[list[float]] = []
        self._undo: list = []

    @staticmethod
    def _bucket() -> dict:
        return {"wall": defaultdict(float), "cpu": defaultdict(float),
                "cpu_start": time.thread_time(), "cpu_end": None, "fsync_n": 0, "fsync_s": 0.0}

    def count_fsync(self) -> None:
        """Count os.fsync calls and their wall time per trial, apart from the categories (the
        Optuna journal calls it once per write; SQLite's own syncs happen in C, unseen here)."""
        original = os.fsync

        def fsync(fd):
            t0 = time.perf_counter()
            try:
                return original(fd)
            finally:
                self.buckets[-1]["fsync_n"] += 1
                self.buckets[-1]["fsync_s"] += time.perf_counter() - t0

        os.fsync = fsync
        self._undo.append((os, "fsync", original))

    def wrap(self, owner, attr: str, category: str, closes_trial: bool = False) -> None:
        original = getattr(owner, attr)
        timer = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            frame = [time.perf_counter(), time.thread_time(), 0.0, 0.0]
            timer._stack.append(frame)
            try:
                return original(*args, **kwargs)
            finally:
                timer._stack.pop()
                wall = time.perf_counter() - frame[0]
                cpu = time.thread_time() - frame[1]
                bucket = timer.buckets[-1]
                bucket["wall"][category] += wall - frame[2]
                bucket["cpu"][category] += cpu - frame[3]
                if timer._stack:
                    timer._stack[-1][2] += wall
                    timer._stack[-1][3] += cpu
                if closes_trial and not timer._stack:
                    bucket["cpu_end"] = time.thread_time()
                    bucket["rss"], bucket["fds"] = _bench.memory_and_fds()
                    timer.buckets.append(timer._bucket())

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def reset_on_entry(self, owner, attr: str) -> None:
        """Start counting afresh when this is called (the worker loop: the study run's own
        MLflow writes before it are not a trial's)."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def entry(*args, **kwargs):
            self.buckets = [self._bucket()]
            return original(*args, **kwargs)

        setattr(owner, attr, entry)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def instrument() -> CallTimer:
    import optuna

    from pipeline.search import engine, objective, space, worker
    from pipeline.search.studyfile import StudyConfig
    from pipeline.tracking import client as tracking
    from pipeline.training import artifacts

    timer = CallTimer()
    timer.reset_on_entry(engine, "run_worker")
    timer.wrap(worker, "claim_trial", "claim (lock, count trials)")
    timer.wrap(optuna.study.Study, "ask", "study.ask (relative sampling)")
    timer.wrap(space, "suggest", "space.suggest (suggest_*)")
    timer.wrap(StudyConfig, "train_config", "train_config (pydantic)")
    timer.wrap(objective, "train", "train()")
    timer.wrap(optuna.trial.Trial, "report", "pruner: report + should_prune")
    timer.wrap(optuna.trial.Trial, "should_prune", "pruner: report + should_prune")
    timer.wrap(optuna.trial.Trial, "set_user_attr", "trial.set_user_attr")
    for name in ("start_run", "log_params", "log_epochs", "log_artifacts", "set_tags", "end_run"):
        timer.wrap(tracking, name, f"mlflow {name}")
    timer.wrap(artifacts, "training_artifacts", "artifact files (csv, torch.save)")
    timer.wrap(optuna.study.Study, "tell", "study.tell", closes_trial=True)
    timer.count_fsync()
    return timer


def apply_experiments(journal_fsync: str, sqlite_sync: str) -> list[str]:
    """Process-wide patches (benchmarks/proposals/patches.py) that try out a proposed change
    without editing the pipeline."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "proposals"))
    import patches

    done = []
    if journal_fsync == "off":
        patches.journal_without_fsync()
        done.append("journal appends without fsync")
    if sqlite_sync == "wal":
        patches.sqlite_wal()
        done.append("MLflow SQLite in WAL mode, synchronous=NORMAL")
    return done


def tiny_study_file(tmp: Path, name: str, sampler: dict) -> Path:
    """studies/coarse.yaml with a tiny fixed training budget and the given sampler."""
    raw = yaml.safe_load((_bench.STUDIES / "coarse.yaml").read_text())
    raw["name"] = name
    raw["description"] = f"search_overhead.py: coarse space, tiny budget, {sampler['name']}"
    raw["fixed"] = {**raw["fixed"], **TINY_FIXED}
    raw["space"] = {k: v for k, v in raw["space"].items() if k not in TINY_FIXED}
    raw["sampler"] = sampler
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(study: str, n_trials: int | None, tmp: Path, profile: bool = False) -> dict:
    """One study in this process, instrumented; returns per-trial rows and breakdown buckets."""
    import optuna

    from pipeline.search.cli import SearchOptions
    from pipeline.search.engine import run_study
    from pipeline.search.studyfile import resolve_study_path

    opts = SearchOptions(study=study, n_trials=n_trials, quiet=True)
    timer = instrument()
    prof = cProfile.Profile() if profile else None
    log = tmp / f"{Path(study).stem}.log"
    try:
        with open(log, "a") as out, contextlib.redirect_stdout(out), _bench.CpuMeter() as cpu:
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            code = run_study(opts)
            if prof:
                prof.disable()
            wall = time.perf_counter() - t0
    finally:
        timer.restore()
    if code != 0:
        raise SystemExit(f"{study}: exit code {code}; see {log}")
    key = yaml.safe_load(resolve_study_path(study).read_text())["name"]
    storage = _bench.open_journal(tmp / "optuna.journal")
    rows = _bench.trial_overheads(_bench.finished_trials(
        optuna.load_study(study_name=key, storage=storage)))
    # Bucket i holds the calls made after trial i-1's tell, up to and including trial i's (one
    # worker; a failed trial would shift the buckets, so refuse to guess).
    buckets = timer.buckets[:len(rows)]
    if len(timer.buckets) != len(rows) + 1:
        raise SystemExit(f"{key}: {len(timer.buckets) - 1} tells for {len(rows)} finished "
                         f"trials; a trial failed? see {log}")
    for row, bucket in zip(rows, buckets):
        row["cpu_overhead"] = (bucket["cpu_end"] - bucket["cpu_start"]
                               - bucket["cpu"].get("train()", 0.0))
    return {"name": key, "rows": rows, "buckets": buckets, "wall": wall, "cpu": cpu,
            "profile": prof}


def window(rows: list[dict], lo: int, hi: int) -> list[int]:
    return [i for i, r in enumerate(rows) if lo <= r["number"] <= hi]


def median_ms(values) -> float:
    return statistics.median(values) * 1000


def breakdown(result: dict, idx: list[int]) -> dict[str, float]:
    """Median wall milliseconds per category over the trials idx, plus 'other'."""
    walls = [result["buckets"][i]["wall"] for i in idx]
    cats = sorted({c for w in walls for c in w} - {"train()"})
    out = {c: median_ms(w.get(c, 0.0) for w in walls) for c in cats}
    out["other"] = median_ms(result["rows"][i]["overhead"] - sum(
        v for c, v in result["buckets"][i]["wall"].items() if c != "train()") for i in idx)
    return out


def print_breakdown(columns: list[tuple[str, dict, list[int]]]) -> None:
    """columns: (heading, run result, trial indices)."""
    tables = [breakdown(r, idx) for _, r, idx in columns]
    print("| call | " + " | ".join(h for h, _, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for cat in sorted(set().union(*tables), key=lambda c: (c == "other", c)):
        print(f"| {cat} | " + " | ".join(f"{t.get(cat, 0.0):.1f}" for t in tables) + " |")
    print("| **overhead, wall (median)** | " + " | ".join(
        f"{median_ms(r['rows'][i]['overhead'] for i in idx):.1f}" for _, r, idx in columns)
        + " |")
    print("| **overhead, main-thread CPU (median)** | " + " | ".join(
        f"{median_ms(r['rows'][i]['cpu_overhead'] for i in idx):.1f}" for _, r, idx in columns)
        + " |")
    print("| of the overhead: journal fsync ms (calls), median | " + " | ".join(
        f"{median_ms(r['buckets'][i]['fsync_s'] for i in idx):.1f} "
        f"({statistics.median(r['buckets'][i]['fsync_n'] for i in idx):.0f})"
        for _, r, idx in columns) + " |")


def print_default(results: list[dict]) -> None:
    print(f"\n### Part 1: default studies (digits, as shipped), in one process, torch "
          f"{_threads()} thread(s)\n")
    print("| study | trials | epochs | wall s (run_study) | worker loop s | sum train_seconds | "
          "overhead share of loop | mean per-trial overhead % | median per-trial overhead ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ov = _bench.overhead_summary(r["rows"])
        print(f"| {r['name']} | {ov['n']} | {sum(x['epochs'] for x in r['rows'])} | "
              f"{r['wall']:.1f} | {ov['loop']:.1f} | {ov['train']:.1f} | {ov['share'] * 100:.1f} %"
              f" | {ov['mean_share'] * 100:.1f} % | {ov['median_ms']:.0f} |")
    print("\nmedian ms per trial by call (exclusive wall time), all trials:\n")
    print_breakdown([(r["name"], r, list(range(len(r["rows"])))) for r in results])
    for r in results:
        print(f"  {r['name']}: {r['cpu'].describe()}")


def print_growth(results: list[dict], early: tuple[int, int], late: tuple[int, int]) -> None:
    e_txt, l_txt = f"{early[0]}-{early[1]}", f"{late[0]}-{late[1]}"
    print(f"\n### Part 2: long studies, tiny fixed budget ({TINY_FIXED}), torch {_threads()} "
          f"thread(s): per-trial overhead, trials {e_txt} vs {l_txt}\n")
    print(f"| study (sampler) | trials | wall s | median train ms | overhead share of loop | "
          f"median overhead ms, {e_txt} | median overhead ms, {l_txt} | ratio (target <= "
          f"{TARGET_GROWTH:g}x) | main-thread CPU overhead ms, {e_txt} -> {l_txt} | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for r in results:
        e, late_idx = window(r["rows"], *early), window(r["rows"], *late)
        if not e or not late_idx:
            print(f"| {r['name']} | {len(r['rows'])} | not enough trials for the windows |")
            continue
        me, ml = (median_ms(r["rows"][i]["overhead"] for i in idx) for idx in (e, late_idx))
        ce, cl = (median_ms(r["rows"][i]["cpu_overhead"] for i in idx) for idx in (e, late_idx))
        ov = _bench.overhead_summary(r["rows"])
        verdict = "PASS" if ml / me <= TARGET_GROWTH else "FAIL"
        print(f"| {r['name']} | {len(r['rows'])} | {r['wall']:.1f} | "
              f"{median_ms(x['train'] for x in r['rows']):.0f} | {ov['share'] * 100:.1f} % | "
              f"{me:.1f} | {ml:.1f} | {ml / me:.2f}x {verdict} | {ce:.1f} -> {cl:.1f} | "
              f"{cl / ce:.2f}x |")
    print(f"\nmedian ms per trial by call (exclusive wall time), trials {e_txt} vs {l_txt}:\n")
    columns = []
    for r in results:
        columns += [(f"{r['name']} {e_txt}", r, window(r["rows"], *early)),
                    (f"{r['name']} {l_txt}", r, window(r["rows"], *late))]
    print_breakdown([c for c in columns if c[2]])
    print_endurance(results, early, late)
    for r in results:
        states = defaultdict(int)
        for i in window(r["rows"], *early) + window(r["rows"], *late):
            states[r["rows"][i]["state"]] += 1
        print(f"  {r['name']}: {r['cpu'].describe()}; trials in the windows by state "
              f"{dict(states)}")


def print_endurance(results: list[dict], early: tuple[int, int], late: tuple[int, int]) -> None:
    """Memory and open files per trial (the endurance targets: growth below 1 MB per trial,
    open file handles flat). RSS counts this process and its children (the MLflow writer),
    sampled when each trial is told; growth is the least-squares slope from the early window on
    (the first trials warm caches and allocators)."""
    print("\nmemory and open files, sampled as each trial is told (this process + its children):"
          "\n")
    print(f"| study | RSS at trial {early[1]} MiB | RSS at the last trial MiB | growth per trial "
          f"from trial {early[1]} (KiB, target < 1024) | open fds, trials {early[0]}-{early[1]} "
          f"| open fds, trials {late[0]}-{late[1]} |")
    print("|---|---:|---:|---:|---|---|")
    for r in results:
        pts = [(row["number"], b["rss"], b["fds"]) for row, b in zip(r["rows"], r["buckets"])]
        tail = [(n, rss) for n, rss, _ in pts if n >= early[1]]
        if len(tail) < 2:
            continue
        slope = statistics.linear_regression([n for n, _ in tail], [x for _, x in tail]).slope
        fds = {name: sorted({f for n, _, f in pts if lo <= n <= hi})
               for name, (lo, hi) in (("early", early), ("late", late))}
        verdict = "PASS" if slope < 2**20 else "FAIL"
        print(f"| {r['name']} | {tail[0][1] / 2**20:.1f} | {tail[-1][1] / 2**20:.1f} | "
              f"{slope / 1024:.1f} {verdict} | {fds['early']} | {fds['late']} |")


def print_profile(result: dict, n: int = 35) -> None:
    buf = io.StringIO()
    stats = pstats.Stats(result["profile"], stream=buf)
    stats.sort_stats("tottime").print_stats(n)
    print(f"\ncProfile of {result['name']} (whole run_study under the profiler, by own time, "
          f"top {n}):\n")
    print(buf.getvalue())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_window(text: str) -> tuple[int, int]:
    lo, hi = text.split(":")
    return int(lo), int(hi)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-trials", type=int, default=310, help="trials of each long study")
    parser.add_argument("--early", type=parse_window, default=(5, 15), help="LO:HI trial numbers")
    parser.add_argument("--late", type=parse_window, default=(295, 305), help="LO:HI")
    parser.add_argument("--skip-default", action="store_true", help="skip part 1")
    parser.add_argument("--samplers", default="qmc,tpe", help="long studies to run: qmc, tpe")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads (0: torch's default, 2 here)")
    parser.add_argument("--tmp-root", default=None,
                        help="make the temporary folder here (e.g. /dev/shm: no fsync cost)")
    parser.add_argument("--journal-fsync", choices=("on", "off"), default="on",
                        help="experiment: off = Optuna's journal appends without os.fsync "
                        "(no effect since 98791df: pipeline.storage.JournalFile already does)")
    parser.add_argument("--sqlite-sync", choices=("default", "wal"), default="default",
                        help="experiment: wal = MLflow's SQLite in WAL mode, synchronous=NORMAL "
                        "(no effect since b768abb: pipeline.tracking already does)")
    parser.add_argument("--profile", default="", help="cProfile this long study (qmc or tpe)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        # Only training speed changes: it is not what is measured here, and two threads on a busy
        # 2-core machine made a 4-epoch, 16-unit MLP take seconds (benchmarks/README.md).
        torch.set_num_threads(args.torch_threads)
    experiments = apply_experiments(args.journal_fsync, args.sqlite_sync)
    fine_sampler = yaml.safe_load((_bench.STUDIES / "fine.yaml").read_text())["sampler"]
    coarse_sampler = yaml.safe_load((_bench.STUDIES / "coarse.yaml").read_text())["sampler"]
    samplers = {"qmc": coarse_sampler, "tpe": fine_sampler}
    print(f"python {sys.version.split()[0]}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    print(_bench.code_state())
    print(f"torch {torch.get_num_threads()} thread(s); workspace under "
          f"{args.tmp_root or tempfile.gettempdir()}; "
          f"{'EXPERIMENT: ' + ', '.join(experiments) if experiments else 'pipeline as is'}")
    with _bench.workspace("bench-overhead-", keep=args.keep, root=args.tmp_root) as tmp:
        if not args.skip_default:
            print_default([run("coarse", None, tmp), run("fine", None, tmp)])
        long_runs = []
        for name in [s for s in args.samplers.split(",") if s]:
            path = tiny_study_file(tmp, f"tiny-{name}", samplers[name])
            long_runs.append(run(str(path), args.n_trials, tmp, profile=args.profile == name))
        if long_runs:
            print_growth(long_runs, args.early, args.late)
        for r in long_runs:
            if r["profile"]:
                print_profile(r)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
