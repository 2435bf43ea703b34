"""Optuna storages: the journal file without a per-append fsync behaves as Optuna's own."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading

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
