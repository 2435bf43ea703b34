"""Faults, for real: `python -m pipeline.search` subprocesses killed with SIGKILL, stopped with
SIGTERM and Ctrl-C (SIGINT), with one worker or several, and an `mlflow server` that goes away in
the middle of a study. Tiny digits trials, one thread. One test kills one of four workers that
share a PostgreSQL study and an `mlflow server` (tests/services.py), as on many machines.

To act "in the middle of a trial" without guessing at timings, a test waits until a trial is
in its training loop (an epoch reported, not yet the last), freezes the process group
(SIGSTOP), checks again, and only then sends the signal (and SIGCONT). Deadlines below only stop
a hung test; no assertion depends on how long anything takes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from search_fixtures import (
    RUN_STATUS,
    all_runs,
    free_port,
    fresh_store,
    load,
    one_torch_thread,
    run_search,
    store_uri,
    study_runs,
    worker_env,
    write_study,
)
from services import NO_JOB_RUNNER, WORKER, MlflowServer, mlflow_server, postgres  # noqa: F401

from pipeline import doctor
from pipeline.search import storage
from pipeline.search.objective import trial_seed
from pipeline.tracking import spool
from pipeline.tracking.writer import PROCESS_NAME

assert one_torch_thread  # an autouse fixture, imported to apply to this module

KEY = "faults"
HANG = 300  # seconds: only a hung process reaches this
HEARTBEAT = {"PIPELINE_HEARTBEAT_SECONDS": "1", "PIPELINE_GRACE_SECONDS": "2"}
EPOCHS = 15


def faults_study(folder: Path, n_trials: int) -> Path:
    """Trials of a second or two (EPOCHS one-thread epochs, each reported), nothing pruned."""
    body = {"name": KEY, "sampler": {"name": "random", "seed": 0}, "n_trials": n_trials,
            "fixed": {"schedule": "constant", "epochs": EPOCHS, "batch_size": 32,
                      "threads": 1},
            "space": {"width": {"type": "int", "low": 8, "high": 32}}}
    return write_study(folder, KEY, json.dumps(body))


_STARTED: list = []  # every process group a test started, ended by `cleanup` if still there


@pytest.fixture(autouse=True)
def cleanup():
    """A failing test must not leave its searches behind (frozen ones included)."""
    yield
    while _STARTED:
        search = _STARTED.pop()
        if search.proc.poll() is None:  # the group leader lives: the group is still ours
            search.kill_all(signal.SIGKILL)
            search.proc.wait()


def _group(pgid: int) -> dict[int, str]:
    """Processes of a process group and their states (R, S, T, Z, ...), from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid:
            out[int(stat.parent.name)] = state
    return out


def _ctrl_c_as_at_a_terminal() -> None:
    """A search started from a terminal gets SIGINT's default action. A suite run in the
    background (`cmd &` in a script, some CI runners) has SIGINT ignored, which children
    inherit and the search rightly keeps ignoring (pipeline/interrupt.py): its Ctrl-C test
    would then see no Ctrl-C at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Search:
    """`python -m pipeline.search` in its own session (so its whole process group can be
    signalled), cwd and MLflow store in `folder`."""

    def __init__(self, folder: Path, *argv: str, env: dict | None = None, tracking: str = "",
                 log: str = "search.out"):
        self.folder, self.log = folder, folder / log
        self.out = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.search", "--study", str(folder / f"{KEY}.yaml"),
             "--quiet", *argv], cwd=folder, env=worker_env(tracking or store_uri(folder),
                                                           **(env or {})),
            stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_ctrl_c_as_at_a_terminal)
        _STARTED.append(self)

    def output(self) -> str:
        if not self.out.closed:
            self.out.flush()
        return self.log.read_text()

    def wait(self) -> int:
        code = self.proc.wait(HANG)
        self.out.close()
        return code

    def kill_all(self, sig=signal.SIGKILL) -> None:
        os.killpg(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            # A process stops when it next runs, which on a busy machine can be later than the
            # next signal we send it (a SIGTERM pending with a SIGSTOP is delivered first):
            # frozen means every process of the group shown stopped.
            deadline = time.monotonic() + HANG
            while any(state not in "TtZX" for state in _group(self.proc.pid).values()):
                assert time.monotonic() < deadline, _group(self.proc.pid)
                time.sleep(0.01)


def training(study: optuna.Study, min_number: int = 0):
    """Trials in their training loop: an epoch reported, and not yet the last one (after it
    come the test evaluation, the artifacts and the final writes)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if 0 < len(t.intermediate_values) < EPOCHS and t.number >= min_number]


def trial_run(client: MlflowClient, trial):
    """The trial's MLflow run: by the id recorded on the trial, else by its tags, as stale.py
    finds it. A trial caught in its first epochs may not have recorded the id yet: the writer
    process makes the run while the trial trains (pipeline/search/objective.py, _RunLink)."""
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        return client.get_run(run_id)
    (run,) = [r for r in all_runs(client) if r.data.tags.get("pipeline.kind") == "trial"
              and r.data.tags.get("pipeline.study") == KEY
              and r.data.tags.get("pipeline.trial_number") == str(trial.number)]
    return run


def catch_mid_trial(search: Search, study_of, min_number: int = 0) -> list:
    """Freeze the search (SIGSTOP, every process of its group) while a trial numbered at least
    `min_number` is in its training loop; returns those trials, checked while frozen."""
    deadline = time.monotonic() + HANG
    while True:
        assert time.monotonic() < deadline, search.output()
        assert search.proc.poll() is None, f"exited early:\n{search.output()}"
        study = study_of()
        if study is not None and _reading(training, study, min_number):
            search.kill_all(signal.SIGSTOP)
            # Frozen mid-write, a search may hold SQLite's write lock: the read then times out
            # ("database is locked"), and the search is let go on and caught again.
            caught = _reading(training, study, min_number)
            if caught:
                return caught
            search.kill_all(signal.SIGCONT)
        time.sleep(0.05)


def _reading(read, *args):
    """``read(*args)``, or None when the storage is locked by a writer."""
    try:
        return read(*args)
    except optuna.exceptions.StorageInternalError:
        return None


def journal_study(folder: Path):
    def study_of():
        if not (folder / "optuna.journal").exists():
            return None
        try:
            return load(folder, KEY)
        except KeyError:  # the study is not created yet
            return None
    return study_of


def rdb_study(url: str):
    """The study in an RDB storage the searches are making, read through one connection pool
    (a pool per poll leaked PostgreSQL connections) opened as they open it: under their schema
    lock, and only once they made Optuna's tables (opening a storage creates them, and would
    race the searches doing it)."""
    spec, opened = storage.parse_storage(url), []

    def study_of():
        try:  # the searches may be creating the tables and the study right now
            if not opened:
                if storage.no_optuna_tables(spec):
                    return None
                opened.append(storage.open_storage(spec))
            return optuna.load_study(study_name=KEY, storage=opened[0])
        except Exception:
            return None
    return study_of


def snapshot(study: optuna.Study) -> dict:
    """Finished trials: state, value, parameters, run."""
    return {t.number: (t.state, t.value, t.params, t.user_attrs["mlflow_run_id"])
            for t in study.trials if t.state.is_finished()}


def kept(before: dict, study: optuna.Study) -> bool:
    return {n: v for n, v in snapshot(study).items() if n in before} == before


def runs_mirror_trials(client: MlflowClient, study: optuna.Study) -> bool:
    """Every finished trial's run ended as doctor.MIRROR says, and no run is left RUNNING."""
    mirrored = all(client.get_run(t.user_attrs["mlflow_run_id"]).info.status
                   in doctor.MIRROR[t.state.name]
                   for t in study.trials
                   if t.state.is_finished() and "mlflow_run_id" in t.user_attrs)
    return mirrored and not [r for r in all_runs(client) if r.info.status == "RUNNING"]


# -- SIGKILL with heartbeats (SQLite RDB storage) -------------------------------------------------


def test_a_worker_killed_mid_trial_is_failed_retried_once_and_the_study_completes(
        tmp_path, empty_mlflow_db, monkeypatch):
    client = fresh_store(tmp_path, empty_mlflow_db)
    faults_study(tmp_path, n_trials=2)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = Search(tmp_path, "--storage", url, env=HEARTBEAT)
    study_of = rdb_study(url)
    (killed,) = catch_mid_trial(search, study_of)
    os.kill(search.proc.pid, signal.SIGKILL)  # the worker only: its MLflow writer drains, exits
    search.kill_all(signal.SIGCONT)
    assert search.wait() == -signal.SIGKILL
    assert study_of().trials[killed.number].state == TrialState.RUNNING  # nobody told Optuna

    # The next start (here the same command again) finds the trial's heartbeat silent: failed,
    # retried once with the same parameters, and the study reaches its count.
    for name, value in HEARTBEAT.items():
        monkeypatch.setenv(name, value)
    result = run_search(tmp_path, "--study", str(tmp_path / f"{KEY}.yaml"), "--storage", url)
    assert result.code == 0, result.out + result.err
    trials = optuna.load_study(study_name=KEY, storage=url).trials
    assert trials[killed.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    assert len(trials) == 3  # the killed one, its retry, and one more: retried once, not twice
    dead_run = trial_run(client, killed)
    assert dead_run.info.status == "KILLED"
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.info.run_id != dead_run.info.run_id
    assert retry_run.info.status == "FINISHED"
    assert retry_run.data.tags["pipeline.retry_of"] == str(killed.number)
    assert retry_run.data.params["seed"] == str(trial_seed(0, killed.number))  # trained alike
    assert runs_mirror_trials(client, optuna.load_study(study_name=KEY, storage=url))


# -- SIGKILL of one of four workers (PostgreSQL and an `mlflow server`, as on many machines) -------

WORKERS = 4
# Heartbeats for four workers, a database server and a tracking server on 2 cores: a beat a
# second, and a grace period long enough that no live worker's trial is ever taken for dead.
PG_HEARTBEAT = {"PIPELINE_HEARTBEAT_SECONDS": "1", "PIPELINE_GRACE_SECONDS": "6"}


def catch_a_worker_mid_trial(searches: list[Search], study_of) -> tuple[Search, object]:
    """catch_mid_trial for one of several launches: freeze the launch whose worker (the trial's
    ``worker`` attribute, liveness.py) holds a trial in its training loop; returns it and the
    trial, checked while frozen."""
    by_pid = {s.proc.pid: s for s in searches}
    deadline = time.monotonic() + HANG
    while True:
        assert time.monotonic() < deadline, "\n".join(s.output() for s in searches)
        for s in searches:
            assert s.proc.poll() is None, f"exited early:\n{s.output()}"
        study = study_of()
        for trial in training(study) if study is not None else []:
            search = by_pid[int(trial.user_attrs["worker"].rsplit(":", 2)[1])]
            search.kill_all(signal.SIGSTOP)
            if trial.number in {t.number for t in training(study_of() or study)}:
                return search, trial
            search.kill_all(signal.SIGCONT)
        time.sleep(0.05)


def test_one_of_four_workers_killed_on_postgres_is_retried_once_and_the_stores_agree(
        tmp_path, postgres, mlflow_server, monkeypatch):  # noqa: F811
    """docs/scaling-out.md's set-up (PostgreSQL study, `mlflow server` with basic-auth, four
    separate launches) and docs/faults.md's dead worker: one launch is SIGKILLed mid-trial.
    Its trial's heartbeat falls silent; a surviving worker, waiting for the others' last
    trials, fails it, requeues it once (however many workers notice) and runs the retry; the
    study still has exactly n_trials finished trials, and nothing is left RUNNING anywhere."""
    n_trials = WORKERS
    faults_study(tmp_path, n_trials=n_trials)
    url = postgres.createdb(KEY)
    env = {**PG_HEARTBEAT, "MLFLOW_EXPERIMENT_NAME": KEY, **MlflowServer.credentials(WORKER)}
    searches = [Search(tmp_path, "--storage", url, "--workers", "1", env=env,
                       tracking=mlflow_server.uri, log=f"worker-{i}.out")
                for i in range(WORKERS)]

    victim, killed = catch_a_worker_mid_trial(searches, rdb_study(url))
    os.kill(victim.proc.pid, signal.SIGKILL)  # the worker only: its MLflow writer drains, exits
    victim.kill_all(signal.SIGCONT)
    assert victim.wait() == -signal.SIGKILL
    for search in searches:
        if search is not victim:
            assert search.wait() == 0, search.output()
    # A survivor, waiting for the others' last trials, found the silent heartbeat.
    said = f"marked 1 stale trial(s) failed: [{killed.number}]"
    assert any(said in s.output() for s in searches if s is not victim)

    trials = optuna.load_study(study_name=KEY, storage=url).trials
    assert trials[killed.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    assert retry in finished
    assert len(trials) == n_trials + 1  # the killed trial, retried once: nothing else failed
    assert not [t.number for t in trials if not t.state.is_finished()]  # none RUNNING, WAITING

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", WORKER[0])  # the workers' account reads all
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", WORKER[1])
    runs = all_runs(client)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    trial_runs = {}
    for r in runs:
        if r.data.tags.get("pipeline.kind") == "trial":
            trial_runs.setdefault(int(r.data.tags["pipeline.trial_number"]), []).append(r)
    assert sorted(trial_runs) == [t.number for t in trials]  # one run per trial, none twice
    assert all(len(found) == 1 for found in trial_runs.values())
    (dead_run,) = trial_runs[killed.number]
    assert dead_run.info.status in ("FAILED", "KILLED")
    (retry_run,) = trial_runs[retry.number]
    assert retry_run.info.status == RUN_STATUS[retry.state]
    assert retry_run.data.tags["pipeline.retry_of"] == str(killed.number)
    assert retry_run.data.params["seed"] == str(trial_seed(0, killed.number))  # trained alike
    (study_run,) = study_runs(client, KEY)
    assert study_run.info.status == "FINISHED"

    # The doctor, run where the study ran, against both stores: nothing to repair.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = doctor.main(["--study", KEY, "--storage", url])
    assert code == 0, out.getvalue()
    assert "healthy" in out.getvalue()


# -- SIGTERM and Ctrl-C ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code, said", [
    (signal.SIGTERM, 143, "stopped by SIGTERM: the running trial was marked failed"),
    (signal.SIGINT, 130, "interrupted: the running trial was marked failed"),
])
def test_sigterm_and_ctrl_c_fail_the_running_trial_kill_its_run_and_rerun_continues(
        tmp_path, empty_mlflow_db, sig, code, said):
    client = fresh_store(tmp_path, empty_mlflow_db)
    faults_study(tmp_path, n_trials=2)
    search = Search(tmp_path)
    (stopped,) = catch_mid_trial(search, journal_study(tmp_path), min_number=1)
    before = snapshot(load(tmp_path, KEY))
    assert before  # at least one trial had finished
    os.kill(search.proc.pid, sig)
    search.kill_all(signal.SIGCONT)
    assert search.wait() == code, search.output()
    assert said in search.output()

    study = load(tmp_path, KEY)
    trial = study.trials[stopped.number]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["error"].startswith("interrupted")
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert client.get_metric_history(run.info.run_id, "val_acc")  # its epochs so far, kept
    assert kept(before, study)
    (study_run,) = study_runs(client, KEY)
    assert study_run.info.status == "KILLED"
    assert runs_mirror_trials(client, study)

    again = run_search(tmp_path, "--study", str(tmp_path / f"{KEY}.yaml"))
    assert again.code == 0, again.out + again.err
    study = load(tmp_path, KEY)
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 2
    assert kept(before, study)
    assert runs_mirror_trials(client, study)


def _children(pid: int) -> list[int]:
    """Helper workers of the launcher: its children forked from it (the same command line), not
    its MLflow writer (forked too, but named apart)."""
    out, own = [], Path(f"/proc/{pid}/cmdline").read_bytes()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
            name = (stat.parent / "comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if ppid == pid and cmdline == own and name != PROCESS_NAME:
            out.append(int(stat.parent.name))
    return out


def _sigterm_pending(pid: int) -> bool:
    """SIGTERM sent to the process and not yet delivered (it is stopped)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_sigterm_to_the_launcher_reaches_every_worker(tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    faults_study(tmp_path, n_trials=3)
    search = Search(tmp_path, "--workers", "2")
    caught = catch_mid_trial(search, journal_study(tmp_path))
    workers = _children(search.proc.pid)
    assert len(workers) == 1  # the launcher is the first worker, a forked helper the second
    before = snapshot(load(tmp_path, KEY))
    # SIGTERM to the launcher alone, as `kill PID` does; it forwards SIGTERM to its workers.
    os.kill(search.proc.pid, signal.SIGTERM)
    os.kill(search.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + HANG
    while not all(_sigterm_pending(pid) for pid in workers):  # forwarded, workers still frozen
        assert time.monotonic() < deadline and search.proc.poll() is None, search.output()
        time.sleep(0.05)
    search.kill_all(signal.SIGCONT)
    assert search.wait() == 143, search.output()

    study = load(tmp_path, KEY)
    for t in caught:  # the trials running when the signal came: failed, runs KILLED
        trial = study.trials[t.number]
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs["error"] == "interrupted: stopped by SIGTERM"
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert kept(before, study)
    assert runs_mirror_trials(client, study)
    assert "exited abnormally" not in search.output()
    assert "Traceback" not in search.output()  # the helper stopped as cleanly as the launcher

    again = run_search(tmp_path, "--study", str(tmp_path / f"{KEY}.yaml"))
    assert again.code == 0, again.out + again.err
    assert [t.state for t in load(tmp_path, KEY).trials].count(TrialState.COMPLETE) == 3


# -- every process killed (journal storage) -------------------------------------------------------


def test_when_every_process_died_the_next_start_cleans_up_and_completes(
        tmp_path, empty_mlflow_db, capsys):
    """SIGKILL to every process of a search (the worker and its MLflow writer; a launcher's
    spawned workers are the same case, tested with SIGTERM above). Journal files have no
    heartbeats: the next start sees that the process that held the RUNNING trial is gone
    (liveness.py), fails it, requeues it once with its parameters, and KILLs its run. Writes
    still queued when everything died are what pipeline.doctor repairs."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    faults_study(tmp_path, n_trials=2)
    search = Search(tmp_path)
    catch_mid_trial(search, journal_study(tmp_path))
    caught = load(tmp_path, KEY).get_trials(states=(TrialState.RUNNING,))  # all, frozen
    search.kill_all(signal.SIGKILL)
    search.wait()

    result = run_search(tmp_path, "--study", str(tmp_path / f"{KEY}.yaml"))
    assert result.code == 0, result.out + result.err
    assert f"marked {len(caught)} stale trial(s) failed: {[t.number for t in caught]}" \
        in result.out
    trials = load(tmp_path, KEY).trials
    for t in caught:
        assert trials[t.number].state == TrialState.FAIL
        assert "stale" in trials[t.number].user_attrs["error"]
        assert trial_run(client, t).info.status == "KILLED"
        (retry,) = [r for r in trials if r.system_attrs.get("failed_trial") == t.number]
        assert retry.params == t.params and retry.state == TrialState.COMPLETE
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(tmp_path))
        capsys.readouterr()
        assert doctor.main(["--study", KEY, "--repair"]) == 0, capsys.readouterr().out
    assert runs_mirror_trials(client, load(tmp_path, KEY))


# -- the tracking server goes away ----------------------------------------------------------------


class Server:
    """`mlflow server` on a SQLite backend in `folder` (a copy of the empty store, whose schema
    costs seconds to create), artifacts proxied into `folder`."""

    def __init__(self, folder: Path, template: Path):
        if not (folder / "server.db").exists():
            (folder / "server.db").write_bytes(template.read_bytes())
        self.uri = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env |= NO_JOB_RUNNER
        self.log = (folder / "server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", self.uri.rsplit(":", 1)[1], "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "server-artifacts")],
            cwd=folder, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + HANG
        while True:
            assert self.proc.poll() is None, (folder / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def test_a_tracking_server_that_goes_away_loses_no_result(tmp_path, empty_mlflow_db,
                                                         monkeypatch, capsys):
    faults_study(tmp_path, n_trials=2)
    server = Server(tmp_path, empty_mlflow_db)
    try:
        # An experiment the server makes: its artifacts go through the server too.
        search = Search(tmp_path, "--experiment", KEY, tracking=server.uri,
                        env={"PIPELINE_TRACKING_RETRY_SECONDS": "1"})
        (trial,) = catch_mid_trial(search, journal_study(tmp_path))
        server.stop()  # while the trial is frozen mid-way: its last writes cannot land
        search.kill_all(signal.SIGCONT)
        assert search.wait() == 1, search.output()
    finally:
        server.stop()
    said = search.output()
    assert f"the MLflow tracking store '{server.uri}' stopped answering" in said
    assert f"python -m pipeline.doctor --study {KEY} --repair" in said

    # The trial's result is in Optuna, and what MLflow missed is in the spool.
    study = load(tmp_path, KEY)
    done = study.trials[trial.number]
    assert done.state == TrialState.COMPLETE and done.value is not None
    run_id = done.user_attrs["mlflow_run_id"]
    monkeypatch.chdir(tmp_path)
    kept = spool.pending(run_id)
    assert "log_artifacts" in [r["method"] for r in kept]  # through the server, so spooled
    assert [r["method"] for r in kept][-1] == "set_terminated"
    final = {m[0]: m[1] for r in kept if r["method"] == "log_batch" for m in r["metrics"]}
    assert final["objective"] == done.value

    # The server comes back (same backend store, another port): the doctor writes it all in.
    server = Server(tmp_path, empty_mlflow_db)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        capsys.readouterr()
        code = doctor.main(["--study", KEY, "--repair"])
        out = capsys.readouterr().out
        assert f"wrote the {len(kept)} spooled write(s) of run {run_id}" in out
        assert code == 0, out
        client = MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["objective"] == done.value
        assert {"config.json", "history.csv"} <= {a.path for a in client.list_artifacts(run_id)}
        assert spool.spooled_runs() == []
    finally:
        server.stop()
