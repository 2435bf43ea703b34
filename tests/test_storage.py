"""Optuna storages: the journal file without a per-append fsync behaves as Optuna's own."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import subprocess
import threading
import time

import optuna
import pytest

from pipeline.search.storage import JournalFile, open_storage, parse_storage


def _fill(study: optuna.Study) -> None:
    for i in range(4):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
        trial.report(i / 10, 0)
        trial.set_user_attr("i", i)
        study.tell(trial, [0.5, None, 0.25, None][i],
                   state=None if i % 2 == 0 else optuna.trial.TrialState.PRUNED)


def _summary(study: optuna.Study) -> list:
    return [(t.number, t.state, t.params, t.value, t.user_attrs, t.intermediate_values)
            for t in study.get_trials()]


def test_journal_file_reads_back_what_optunas_backend_writes_and_vice_versa(tmp_path):
    ours, theirs = str(tmp_path / "ours.journal"), str(tmp_path / "theirs.journal")
    a = optuna.create_study(study_name="s", sampler=optuna.samplers.RandomSampler(seed=0),
                            storage=optuna.storages.JournalStorage(JournalFile(ours)))
    b = optuna.create_study(study_name="s", sampler=optuna.samplers.RandomSampler(seed=0),
                            storage=optuna.storages.JournalStorage(
                                optuna.storages.journal.JournalFileBackend(theirs)))
    _fill(a)
    _fill(b)
    # each file is read by the other implementation: the format is Optuna's own
    read_ours = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(ours)))
    read_theirs = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        JournalFile(theirs)))
    assert _summary(read_ours) == _summary(read_theirs) == _summary(b)
    assert len(read_ours.trials) == 4


def test_journal_file_appends_without_fsync(tmp_path, monkeypatch):
    def refuse(fd):
        raise AssertionError("os.fsync called")

    storage = open_storage(parse_storage(str(tmp_path / "s.journal")))
    monkeypatch.setattr(os, "fsync", refuse)
    study = optuna.create_study(study_name="s", storage=storage)
    _fill(study)
    assert len(study.trials) == 4


def _append_trials(path: str, n: int, optunas_own: bool = False) -> None:
    storage = (optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
               if optunas_own else open_storage(parse_storage(path)))
    study = optuna.load_study(study_name="s", storage=storage)
    for _ in range(n):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
        study.tell(trial, 1.0)


@pytest.mark.parametrize("kill, mixed", [(False, False), (True, False), (False, True)])
def test_concurrent_writers_and_a_killed_one_leave_a_readable_journal(tmp_path, kill, mixed):
    """mixed: one writer is Optuna's own backend (its symlink lock, not our flock), as
    optuna-dashboard would be; O_APPEND writes of whole lines still never interleave."""
    path = str(tmp_path / "s.journal")
    optuna.create_study(study_name="s", storage=open_storage(parse_storage(path)))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_trials, args=(path, 20, mixed and i == 0))
             for i in range(3)]
    for p in procs:
        p.start()
    if kill:  # one writer dies at some point of its appends: what it wrote stays readable
        procs[0].kill()
    for p in procs:
        p.join(60)
    study = optuna.load_study(study_name="s", storage=open_storage(parse_storage(path)))
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # unique, dense: no lost or torn appends
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 60 if not kill else 40 <= len(complete) <= 60
    assert all(t.value == 1.0 for t in complete)


def test_an_append_waits_for_the_lock_another_holds_and_then_lands_whole(tmp_path):
    path = tmp_path / "s.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(parse_storage(str(path))))
    size = path.stat().st_size
    appended = threading.Event()

    def append():
        study.set_user_attr("k", "v")
        appended.set()

    with open(path, "ab") as other:  # another writer (its own open file) holds the lock
        fcntl.flock(other, fcntl.LOCK_EX)
        writer = threading.Thread(target=append)
        writer.start()
        assert not appended.wait(0.5)
        assert path.stat().st_size == size  # nothing written while the lock was held
        fcntl.flock(other, fcntl.LOCK_UN)
    writer.join(10)
    assert appended.is_set()
    reread = optuna.load_study(study_name="s", storage=open_storage(parse_storage(str(path))))
    assert reread.user_attrs == {"k": "v"}


def test_a_forked_child_appends_through_its_own_open_file(tmp_path):
    """flock belongs to an open file: a child sharing its parent's would not be excluded."""
    path = str(tmp_path / "s.journal")
    backend = JournalFile(path)
    storage = optuna.storages.JournalStorage(backend)
    optuna.create_study(study_name="s", storage=storage)
    parent_fd = backend._fd
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            optuna.load_study(study_name="s", storage=storage).set_user_attr("child", 1)
            os.write(write, str(int(backend._fd != parent_fd)).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert backend._fd == parent_fd
    reread = optuna.load_study(study_name="s", storage=open_storage(parse_storage(path)))
    assert reread.user_attrs == {"child": 1}


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_worker_claiming_while_a_stale_trial_is_failed_takes_its_retry_not_a_new_trial(
        tmp_path, empty_mlflow_db, monkeypatch, kind):
    """A survivor fails a dead worker's trial and requeues it. Another worker counting the
    budget in between (the trial failed, its retry not yet queued) would find one trial short,
    start a new one, and the study would end with n_trials + 1: it must wait for the lock and
    take the retry. The window is held open here by a requeue that waits for that claim."""
    from types import SimpleNamespace

    from search_fixtures import fresh_store

    from pipeline.search import liveness, stale, storage as storage_mod, worker

    monkeypatch.setenv("PIPELINE_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("PIPELINE_GRACE_SECONDS", "1")
    claims, requeue = [], storage_mod.retry_stale

    def requeue_while_another_claims(study, trial):
        other = threading.Thread(target=lambda: claims.append(
            worker.claim_trial(study, plan, None)))
        other.start()
        other.join(1.0)  # done at once when nothing holds the lock; else it waits for us
        claims.append(other)
        requeue(study, trial)

    monkeypatch.setattr(storage_mod, "retry_stale", requeue_while_another_claims)
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else str(
        tmp_path / "optuna.journal")
    spec = storage_mod.parse_storage(url)
    study = optuna.create_study(study_name="s", storage=storage_mod.open_storage(spec))
    plan = SimpleNamespace(storage=spec, key="s", n_trials=2)
    dead = study.ask()
    if kind == "sqlite":
        study._storage.record_heartbeat(dead._trial_id)  # one beat, then silence
    else:  # a journal: the process that claimed it is gone
        gone = subprocess.Popen(["sleep", "0"])
        study._storage.set_trial_user_attr(dead._trial_id, liveness.WORKER_ATTR,
                                           liveness.worker_id(gone.pid))
        gone.wait()
    study.tell(study.ask(), 1.0)
    time.sleep(2.0)  # past the grace period (1 s)

    (failed,) = stale.fail_stale(study, spec, fresh_store(tmp_path, empty_mlflow_db))
    other = next(c for c in claims if isinstance(c, threading.Thread))
    other.join()
    (claimed,) = [c for c in claims if not isinstance(c, threading.Thread)]
    assert failed.number == dead.number
    retry = study.trials[claimed.number]
    assert retry.system_attrs.get("failed_trial") == dead.number  # the retry, not a new trial
    assert len(study.trials) == 3  # the dead trial, the finished one, the retry
