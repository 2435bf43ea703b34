"""Helpers the search benchmarks share: an isolated workspace, machine load, and trial timings.

Not a benchmark itself. Every benchmark works in a temporary folder (its working directory, the
Optuna journal and the MLflow SQLite store), so nothing lands in the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "studies"
# Inherited from `mlflow run` or a shell: they would redirect runs or storages out of the workspace.
FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
               "MLFLOW_EXPERIMENT_NAME", "OPTUNA_STORAGE")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def workspace_env(tmp: Path) -> dict[str, str]:
    """The environment a benchmark's studies run under: MLflow in tmp/mlflow.db, no progress
    bars writing artifacts, nothing inherited that points elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


@contextlib.contextmanager
def workspace(prefix: str, keep: bool = False, root: str | None = None) -> Iterator[Path]:
    """A temporary folder (under root, else the system's) that becomes this process's working
    directory and MLflow store."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.environ.clear()
    os.environ.update(workspace_env(tmp))
    os.chdir(tmp)
    try:
        yield tmp
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        if keep:
            print(f"(workspace kept: {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


class CpuMeter:
    """CPU used by other processes while a block ran, in cores (load average cannot tell a
    benchmark's own two busy cores apart from someone else's)."""

    def __enter__(self):
        self.load_before = os.getloadavg()[0]
        self._all0, self._own0 = self._read()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        all1, own1 = self._read()
        self.seconds = time.perf_counter() - self._t0
        self.load_after = os.getloadavg()[0]
        self.other_cores = max(0.0, (all1 - self._all0) - (own1 - self._own0)) / self.seconds
        self.own_cores = (own1 - self._own0) / self.seconds

    @staticmethod
    def _read() -> tuple[float, float]:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9])
        t = os.times()  # children: subprocesses this process has waited for
        own = t.user + t.system + t.children_user + t.children_system + _live_children()
        return (user + nice + system + irq + softirq + steal) / _CLK_TCK, own

    def describe(self) -> str:
        return (f"load average {self.load_before:.2f} -> {self.load_after:.2f}; this benchmark "
                f"used {self.own_cores:.2f} cores, other processes {self.other_cores:.2f} cores")


def _live_children() -> float:
    """CPU seconds of this process's running children (such as the MLflow writer process),
    which os.times() counts only once they have been waited for."""
    me, total = str(os.getpid()), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[1] == me:  # ppid; then utime, stime at 14, 15 (1-based, after the name)
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


def memory_and_fds() -> tuple[int, int]:
    """Resident bytes of this process and its running children, and this process's open file
    descriptors."""
    me, rss = str(os.getpid()), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if pid == me or fields[1] == me:
            rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss, in pages
    return rss, len(os.listdir("/proc/self/fd"))


def code_state() -> str:
    """The commit and the uncommitted changes to the code and study files measured (other
    people edit them while benchmarks run)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True).stdout.strip()

    changed = git("status", "--short", "--", "pipeline", "studies").splitlines()
    studies = {p.name: hashlib.sha1(p.read_bytes()).hexdigest()[:8]
               for p in sorted(STUDIES.glob("*.yaml"))}
    return (f"code: commit {git('rev-parse', '--short', 'HEAD') or '?'}, uncommitted "
            f"{', '.join(x.strip() for x in changed) or 'none'}; study files "
            + ", ".join(f"{k} {v}" for k, v in studies.items()))


def open_journal(path: Path | str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def finished_trials(study) -> list:
    """Complete and pruned trials in number order (failed ones are not part of the search)."""
    from optuna.trial import TrialState

    return sorted((t for t in study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
                  key=lambda t: t.number)


def trial_overheads(trials: Sequence) -> list[dict]:
    """Per-trial orchestration overhead for a single worker whose trials ran back to back.

    A trial's loop time is from the previous trial's completion (the first: its own start) to its
    own completion; overhead = loop time - ``train_seconds`` (time inside train() minus the epoch
    callback's own time). So overhead covers claiming and asking, suggesting, MLflow runs, params,
    metrics and artifacts, the pruner, telling, and printing the trial line.
    """
    rows, prev = [], None
    for t in sorted(trials, key=lambda t: t.number):
        begin = t.datetime_start if prev is None else prev.datetime_complete
        loop = (t.datetime_complete - begin).total_seconds()
        train = t.user_attrs.get("train_seconds", 0.0)
        rows.append({"number": t.number, "state": t.state.name, "loop": loop, "train": train,
                     "overhead": loop - train, "epochs": len(t.intermediate_values)})
        prev = t
    return rows


def overhead_summary(rows: Sequence[dict]) -> dict:
    loop = sum(r["loop"] for r in rows)
    train = sum(r["train"] for r in rows)
    shares = [r["overhead"] / r["loop"] for r in rows if r["loop"] > 0]
    return {"n": len(rows), "loop": loop, "train": train, "share": 1 - train / loop if loop else 0,
            "mean_share": statistics.fmean(shares) if shares else 0.0,
            "median_ms": statistics.median(r["overhead"] for r in rows) * 1000 if rows else 0.0}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
