"""pipeline.doctor on broken states built for real: trials made with optuna.trial.create_trial in
a journal file, runs made with the MLflow client in a real SQLite store, writes spooled by
spool.SpoolingClient against a store that refuses connections. No training."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial
from search_fixtures import PARENT, free_port, fresh_store, journal, load, store_uri

from pipeline import doctor, names
from pipeline.tracking import spool

KEY = "s"
DIST = {"width": IntDistribution(8, 64)}


@pytest.fixture
def folder(tmp_path, monkeypatch, empty_mlflow_db):
    fresh_store(tmp_path, empty_mlflow_db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tmp_path))
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("PIPELINE_SPOOL_DIR", raising=False)
    return tmp_path


def run_doctor(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = doctor.main(["--study", KEY, *argv])
    return code, out.getvalue()


def dead_worker() -> str:
    """A worker id (liveness.py's host:pid:start) of a process on this host that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return f"{socket.gethostname()}:{proc.stdout.strip()}:1"


class Broken:
    """One study with one of each problem the doctor knows (and one healthy trial)."""

    def __init__(self, folder: Path):
        self.client = MlflowClient()
        self.study = study = optuna.create_study(study_name=KEY, storage=journal(folder),
                                                 direction="maximize")
        self.study_run = self.run("study", status="RUNNING")
        study.set_user_attr("mlflow_run_id", self.study_run)
        self.runs = {}

        def trial(state, n, run_status=None, value=None, **attrs):
            if run_status:
                self.runs[n] = attrs["mlflow_run_id"] = self.run("trial", n, run_status)
            study.add_trial(create_trial(state=state, value=value, params={"width": 8 + n},
                                         distributions=DIST, user_attrs=attrs))

        trial(TrialState.COMPLETE, 0, "FINISHED", 0.9)                      # healthy
        trial(TrialState.COMPLETE, 1, "RUNNING", 0.8)                       # run left RUNNING
        trial(TrialState.FAIL, 2, "RUNNING", error="interrupted: stopped by SIGTERM")
        trial(TrialState.PRUNED, 3, "FINISHED")                             # status mismatch
        trial(TrialState.COMPLETE, 4, value=0.7)                            # no run at all
        trial(TrialState.COMPLETE, 5, value=0.6, mlflow_run_id="0" * 32)    # run not in store
        trial(TrialState.RUNNING, 6, "RUNNING", worker=dead_worker())       # worker died
        trial(TrialState.COMPLETE, 7, "RUNNING", 0.95)                      # writes spooled
        self.duplicate = self.run("trial", 0, "RUNNING")                    # second run, trial 0
        self.orphan = self.run("trial", 9, "FINISHED")                      # no trial 9
        self._spool_trial_7(folder)

    def run(self, kind: str, number: int | None = None, status: str = "RUNNING") -> str:
        tags = {"pipeline.kind": kind, "pipeline.study": KEY}
        if number is not None:
            tags |= {"pipeline.trial_number": str(number), PARENT: self.study_run}
        run_id = self.client.create_run("0", tags=tags).info.run_id
        if status != "RUNNING":
            self.client.set_terminated(run_id, status)
        return run_id

    def _spool_trial_7(self, folder: Path) -> None:
        """Trial 7's last writes, made while the store refused connections: spooled for real."""
        gone = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
        writer = spool.SpoolingClient(gone, retry_seconds=0)
        run_id = self.runs[7]
        writer.log_batch(run_id, metrics=[Metric("best_val_acc", 0.95, 0, 7),
                                          Metric("val_acc", float("nan"), 0, 3)])
        artifacts = folder / "artifacts-tmp"
        artifacts.mkdir()
        (artifacts / "config.json").write_text('{"width": 15}')
        writer.log_artifacts(run_id, artifacts)
        writer.set_terminated(run_id, "FINISHED")
        with pytest.raises(spool.TrackingLost, match=r"kept in .*\.pipeline/spool"):
            writer.flush()
        assert spool.spooled_runs() == [run_id]


def checks(text: str, check: str) -> int:
    return sum(1 for line in text.splitlines() if f"problem {check}" in " ".join(line.split()))


def test_findings_without_repair_change_nothing(folder):
    broken = Broken(folder)
    code, out = run_doctor()
    assert code == 1
    for check in ("run RUNNING", "status mismatch", "trial without run", "run missing",
                  "trial RUNNING, worker gone", "spooled", "duplicate run", "run without trial",
                  "study run RUNNING"):
        assert checks(out, check) >= 1, f"{check!r} not reported:\n{out}"
    assert checks(out, "run RUNNING") == 2  # trials 1 and 2
    assert "run again with --repair" in out
    # nothing was touched
    assert broken.client.get_run(broken.runs[1]).info.status == "RUNNING"
    assert load(folder, KEY).trials[6].state == TrialState.RUNNING
    assert spool.spooled_runs() == [broken.runs[7]]


def test_repair_fixes_what_is_safe_and_says_so(folder):
    broken = Broken(folder)
    client, runs = broken.client, broken.runs
    code, out = run_doctor("--repair")
    repaired = [line for line in out.splitlines() if line.startswith("repaired: ")]

    # runs left RUNNING mirror their trial: complete -> FINISHED, interrupted -> KILLED
    assert client.get_run(runs[1]).info.status == "FINISHED"
    assert client.get_run(runs[2]).info.status == "KILLED"
    # the dead worker's trial: failed, requeued once with the same parameters, run KILLED
    trials = load(folder, KEY).trials
    assert trials[6].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.params == trials[6].params
    assert retry.system_attrs["failed_trial"] == 6
    assert client.get_run(runs[6]).info.status == "KILLED"
    # the spool was written into the store, in order, and removed
    run7 = client.get_run(runs[7])
    assert run7.info.status == "FINISHED"
    assert run7.data.metrics["best_val_acc"] == 0.95
    assert [m.step for m in client.get_metric_history(runs[7], "val_acc")] == [3]
    local = client.download_artifacts(runs[7], "config.json", str(folder / "dl"))
    assert Path(local).read_text() == '{"width": 15}'
    assert spool.spooled_runs() == [] and not (folder / ".pipeline/spool" / runs[7]).exists()
    # runs no trial points at: tagged, and ended when RUNNING; never deleted
    dup, orphan = client.get_run(broken.duplicate), client.get_run(broken.orphan)
    assert dup.info.status == "KILLED" and "second run for trial 0" in dup.data.tags[
        names.ORPHAN]
    assert orphan.info.status == "FINISHED" and names.ORPHAN in orphan.data.tags
    assert dup.info.lifecycle_stage == orphan.info.lifecycle_stage == "active"
    # the study run whose launcher is gone: KILLED and closed (the next launch opens a new one)
    assert client.get_run(broken.study_run).info.status == "KILLED"
    assert load(folder, KEY).user_attrs["mlflow_run_closed"] == broken.study_run
    # what cannot be repaired safely is left, and still reported: exit 1
    after = out.split("after repair:")[1]
    assert {c for c in ("status mismatch", "trial without run", "run missing")
            if checks(after, c)} == {"status mismatch", "trial without run", "run missing"}
    for check in ("run RUNNING", "worker gone", "spooled", "duplicate run", "study run"):
        assert checks(after, check) == 0, after
    assert code == 1
    assert trials[3].state == TrialState.PRUNED and client.get_run(runs[3]).info.status == \
        "FINISHED"  # a finished run's status is not rewritten
    assert len(repaired) == 7, out  # run 1, run 2, stale, spool, duplicate, orphan, study run

    # a second pass has nothing left to repair
    code, again = run_doctor("--repair")
    assert code == 1 and "repaired:" not in again


def test_a_healthy_study_exits_0(folder):
    client = MlflowClient()
    study = optuna.create_study(study_name=KEY, storage=journal(folder), direction="maximize")
    top = client.create_run("0", tags={"pipeline.kind": "study", "pipeline.study": KEY})
    client.set_terminated(top.info.run_id, "FINISHED")
    for n, (state, status) in enumerate([(TrialState.COMPLETE, "FINISHED"),
                                         (TrialState.PRUNED, "KILLED"),
                                         (TrialState.FAIL, "FAILED")]):
        run = client.create_run("0", tags={"pipeline.kind": "trial", "pipeline.study": KEY,
                                           "pipeline.trial_number": str(n),
                                           PARENT: top.info.run_id})
        client.set_terminated(run.info.run_id, status)
        study.add_trial(create_trial(state=state, value=0.5 if n == 0 else None,
                                     params={"width": 9}, distributions=DIST,
                                     user_attrs={"mlflow_run_id": run.info.run_id}))
    code, out = run_doctor()
    assert code == 0, out
    assert "healthy" in out


@pytest.mark.parametrize("argv, message", [
    (["--study", "nosuch"], "no such study in optuna.journal; studies there: s"),
    (["--study", KEY, "--storage", "other.journal"], "no Optuna storage at other.journal"),
])
def test_unknown_study_or_storage_exits_2(folder, argv, message):
    optuna.create_study(study_name=KEY, storage=journal(folder))
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert doctor.main(argv) == 2
    assert message in out.getvalue()
