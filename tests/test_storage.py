"""Optuna storages: the journal file without a per-append fsync behaves as Optuna's own."""

from __future__ import annotations

import multiprocessing
import os

import optuna
import pytest

from pipeline.storage import JournalFile, open_storage, parse_storage


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


def _append_trials(path: str, n: int) -> None:
    storage = open_storage(parse_storage(path))
    study = optuna.load_study(study_name="s", storage=storage)
    for _ in range(n):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
        study.tell(trial, 1.0)


@pytest.mark.parametrize("kill", [False, True])
def test_concurrent_writers_and_a_killed_one_leave_a_readable_journal(tmp_path, kill):
    path = str(tmp_path / "s.journal")
    optuna.create_study(study_name="s", storage=open_storage(parse_storage(path)))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_trials, args=(path, 20)) for _ in range(3)]
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
