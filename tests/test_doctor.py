"""pipeline.doctor on broken states built for real: trials made with optuna.trial.create_trial in
each kind of Optuna storage the pipeline takes (the default journal file, ``sqlite:///`` and a
real PostgreSQL server, one server for the module), runs made with the MLflow client in a real
SQLite store, writes spooled by spool.SpoolingClient against a store that refuses connections.
No training.

A dead worker's trial is told apart differently per storage (pipeline/search/stale.py): on a
journal file, its process is gone; on an RDB storage, its heartbeat fell silent. Both are made
for real: a process that has exited, and a heartbeat that Optuna itself reports stale.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.distributions import IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState, create_trial
from search_fixtures import PARENT, free_port, fresh_store, journal, store_uri
from services import pg_bin, postgres  # noqa: F401  (postgres: one server for the module)

from pipeline import doctor, names
from pipeline.tracking import spool

KEY = "s"
DIST = {"width": IntDistribution(8, 64)}
GRACE = 1  # PIPELINE_GRACE_SECONDS for RDB storages: a heartbeat older than this is stale
STALE_WAIT = 120  # seconds: only a heartbeat that never goes stale reaches this
_databases = itertools.count()


@pytest.fixture
def folder(tmp_path, monkeypatch, empty_mlflow_db):
    fresh_store(tmp_path, empty_mlflow_db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tmp_path))
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("PIPELINE_SPOOL_DIR", raising=False)
    return tmp_path


@dataclass(frozen=True)
class Storage:
    """An Optuna storage of one kind, as the study was run with, and Optuna's own handle on it
    (Optuna's journal backend, Optuna's RDBStorage: what the doctor reads is not only what the
    pipeline's own storage classes wrote)."""
    kind: str
    url: str | None  # None: the default, ./optuna.journal
    optuna: object

    @property
    def argv(self) -> list[str]:
        return ["--storage", self.url] if self.url else []

    def load(self) -> optuna.Study:
        return optuna.load_study(study_name=KEY, storage=self.optuna)


@pytest.fixture(params=["journal", "sqlite", "postgresql"])
def storage(request, folder, monkeypatch) -> Storage:
    if request.param == "journal":
        return Storage("journal", None, journal(folder))
    monkeypatch.setenv("PIPELINE_GRACE_SECONDS", str(GRACE))  # the doctor's, and the workers'
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'optuna.db'}"
    else:  # a database of its own on the module's server
        url = request.getfixturevalue("postgres").createdb(f"doctor{next(_databases)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return Storage(request.param, url, RDBStorage(url, heartbeat_interval=1,
                                                      grace_period=GRACE))


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

    def __init__(self, folder: Path, storage: Storage):
        self.client = MlflowClient()
        self.study = study = optuna.create_study(study_name=KEY, storage=storage.optuna,
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
        if storage.kind != "journal":
            self._silence_heartbeat(storage.optuna, study.trials[6]._trial_id)

    def _silence_heartbeat(self, rdb: RDBStorage, trial_id: int) -> None:
        """Trial 6's worker beat once, then died: wait until Optuna finds the beat stale."""
        rdb.record_heartbeat(trial_id)
        deadline = time.monotonic() + STALE_WAIT
        while trial_id not in rdb._get_stale_trial_ids(self.study._study_id):
            assert time.monotonic() < deadline, "the heartbeat never went stale"
            time.sleep(0.2)

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


def test_findings_without_repair_change_nothing(folder, storage):
    broken = Broken(folder, storage)
    code, out = run_doctor(*storage.argv)
    assert code == 1
    for check in ("run RUNNING", "status mismatch", "trial without run", "run missing",
                  "trial RUNNING, worker gone", "spooled", "duplicate run", "run without trial",
                  "study run RUNNING"):
        assert checks(out, check) >= 1, f"{check!r} not reported:\n{out}"
    assert checks(out, "run RUNNING") == 2  # trials 1 and 2
    assert "run again with --repair" in out
    # nothing was touched
    assert broken.client.get_run(broken.runs[1]).info.status == "RUNNING"
    assert storage.load().trials[6].state == TrialState.RUNNING
    assert broken.client.get_run(broken.runs[6]).info.status == "RUNNING"
    assert spool.spooled_runs() == [broken.runs[7]]


def test_repair_fixes_what_is_safe_and_says_so(folder, storage):
    broken = Broken(folder, storage)
    client, runs = broken.client, broken.runs
    code, out = run_doctor(*storage.argv, "--repair")
    repaired = [line for line in out.splitlines() if line.startswith("repaired: ")]

    # runs left RUNNING mirror their trial: complete -> FINISHED, interrupted -> KILLED
    assert client.get_run(runs[1]).info.status == "FINISHED"
    assert client.get_run(runs[2]).info.status == "KILLED"
    # the dead worker's trial: failed, requeued once with the same parameters, run KILLED
    trials = storage.load().trials
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
    assert storage.load().user_attrs["mlflow_run_closed"] == broken.study_run
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
    code, again = run_doctor(*storage.argv, "--repair")
    assert code == 1 and "repaired:" not in again
    assert len(storage.load().trials) == len(trials)  # requeued once, not once a pass


def test_a_healthy_study_exits_0(folder, storage):
    client = MlflowClient()
    study = optuna.create_study(study_name=KEY, storage=storage.optuna, direction="maximize")
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
    code, out = run_doctor(*storage.argv)
    assert code == 0, out
    assert "healthy" in out


def test_unknown_study_exits_2(folder, storage):
    optuna.create_study(study_name=KEY, storage=storage.optuna)
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert doctor.main(["--study", "nosuch", *storage.argv]) == 2
    assert f"no such study in {storage.url or 'optuna.journal'}; studies there: s" \
        in out.getvalue()
    assert [s.study_name for s in storage.optuna.get_all_studies()] == [KEY]


@pytest.mark.parametrize("kind", ["journal", "sqlite", "sqlite-empty", "postgresql",
                                  "postgresql-empty"])
def test_a_missing_storage_exits_2_and_nothing_is_created(folder, kind, request):
    """A read-only check creates no storage: no journal or SQLite file, no database, and no
    Optuna tables in a database that has none (an empty file, a database made for another
    use, or a typo in the database's name that happens to name one)."""
    if kind.startswith("postgresql"):
        server = request.getfixturevalue("postgres")
        db = f"doctor{next(_databases)}"
        url = server.createdb(db) if kind.endswith("empty") else server.url(db)
    elif kind == "journal":
        url = "other.journal"
    else:
        url = f"sqlite:///{folder / 'other.db'}"
        if kind.endswith("empty"):
            (folder / "other.db").write_bytes(b"")  # SQLite's empty database
    message = {"postgresql": "cannot open Optuna storage",
               "sqlite": f"no Optuna storage at {folder / 'other.db'}"}.get(
        kind, f"no Optuna storage at {url}")
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert doctor.main(["--study", KEY, "--storage", url]) == 2
    assert message in out.getvalue()

    if kind.startswith("postgresql"):
        def psql(sql: str, database: str = "postgres") -> list[str]:
            return subprocess.run([pg_bin("psql"), "-h", server.host, "-p", str(server.port),
                                   "-U", server.user, "-d", database, "-Atc", sql],
                                  capture_output=True, text=True, check=True).stdout.split()

        made = db in psql("SELECT datname FROM pg_database")
        assert made == kind.endswith("empty")
        if made:
            assert psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", db) == []
        else:
            assert f'database "{db}" does not exist' in out.getvalue()
    elif kind == "sqlite-empty":
        assert (folder / "other.db").read_bytes() == b""
    else:
        assert not list(folder.glob("other*"))


@pytest.mark.parametrize("kind", ["sqlite-empty", "postgresql-empty"])
def test_a_recheck_on_a_database_without_optuna_tables_creates_none(folder, kind, request):
    """`python -m pipeline.recheck` of a study that never ran only reads: pointed at a database
    without Optuna's tables it says so (exit 2) and leaves the database without them."""
    from search_fixtures import STUDIES

    from pipeline import recheck

    if kind == "postgresql-empty":
        server = request.getfixturevalue("postgres")
        db = f"recheck{next(_databases)}"
        url = server.createdb(db)
    else:
        url = f"sqlite:///{folder / 'other.db'}"
        (folder / "other.db").write_bytes(b"")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        code = recheck.main(["--study", str(STUDIES / "coarse.yaml"), "--storage", url])
    assert code == 2, out.getvalue()
    assert "has no completed trial" in out.getvalue()
    if kind == "postgresql-empty":
        tables = subprocess.run(
            [pg_bin("psql"), "-h", server.host, "-p", str(server.port), "-U", server.user, "-d",
             db, "-Atc", "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"],
            capture_output=True, text=True, check=True).stdout.split()
        assert tables == []
    else:
        assert (folder / "other.db").read_bytes() == b""
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
