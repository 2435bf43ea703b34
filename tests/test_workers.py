"""``--workers auto`` (the default): one worker per usable core, the launcher itself the first and
helpers forked from it; still exactly ``n_trials`` trials, and a re-check shares the helpers."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from search_fixtures import (
    all_runs,
    fresh_store,
    load,
    one_torch_thread,
    run_search,
    store_uri,
    worker_env,
    write_study,
)

from pipeline.cli import workers
from pipeline.search import liveness
from pipeline.search.processes import threads_per_worker, usable_cores, worker_count

assert one_torch_thread  # an autouse fixture, imported to apply to this module
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.mark.parametrize("requested, left, expected", [
    (None, 100, usable_cores()),  # auto: one per usable core
    (None, 1, 1),  # never more than the trials left
    (3, 10, 3),
    (3, 2, 2),
    (1, 50, 1),
])
def test_worker_count(requested, left, expected):
    assert worker_count(requested, left) == expected


def test_threads_are_shared_between_the_workers():
    assert threads_per_worker(1) == usable_cores()
    assert threads_per_worker(usable_cores()) == 1
    assert threads_per_worker(10 * usable_cores()) == 1


@pytest.mark.parametrize("text, env, expected", [
    ("auto", None, None), ("AUTO", "1", None), ("", None, None), ("", "3", 3), ("4.0", None, 4),
    ("", "auto", None),
])
def test_workers_flag_and_its_environment_default(monkeypatch, text, env, expected):
    if env is None:
        monkeypatch.delenv("PIPELINE_WORKERS", raising=False)
    else:
        monkeypatch.setenv("PIPELINE_WORKERS", env)
    assert workers(text) == expected


STUDY = """\
    name: {name}
    dataset: digits
    objective: {{metric: val_acc, direction: maximize}}
    sampler: {{name: random, seed: 0}}
    n_trials: {n_trials}
    recheck: {{top_k: 2, seeds: 2}}
    fixed: {{arch: mlp, depth: 1, optimizer: sgd, schedule: constant, lr: 0.05, epochs: 5,
            batch_size: 32}}
    space:
      width: {{type: int, low: 8, high: 64, log: true}}
    """


def test_auto_forks_one_helper_per_extra_core_and_runs_exactly_n_trials(tmp_path,
                                                                         empty_mlflow_db):
    """A real launch with the default --workers, on two cores (pinned, so the test means the
    same on any machine with at least two): the launcher and one forked helper share the search
    and its re-check; exactly n_trials trials and one re-check run per (candidate, seed)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs a machine with at least 2 usable cores")
    client = fresh_store(tmp_path, empty_mlflow_db)
    write_study(tmp_path, "auto", STUDY.format(name="auto", n_trials=8))
    env = worker_env(store_uri(tmp_path))
    env.pop("PIPELINE_WORKERS", None)  # the default: auto
    two = sorted(os.sched_getaffinity(0))[:2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.search", "--study", str(tmp_path / "auto.yaml"),
         "--quiet"], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, two))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out

    study = load(tmp_path, "auto")
    assert [t.state in FINISHED for t in study.trials] == [True] * 8
    by = {t.user_attrs[liveness.WORKER_ATTR] for t in study.trials}
    pids = {int(w.split(":")[1]) for w in by}
    assert proc.pid in pids and len(pids) == 2, by  # the launcher and one helper
    assert "exited abnormally" not in out

    recheck = load(tmp_path, "auto-recheck")
    runs = [r for r in all_runs(client) if r.data.tags.get("pipeline.kind") == "recheck"]
    pairs = sorted((r.data.tags["pipeline.trial_number"], r.data.tags["pipeline.recheck_seed"])
                   for r in runs)
    assert len(pairs) == 4 and len(set(pairs)) == 4
    assert {int(t.user_attrs[liveness.WORKER_ATTR].split(":")[1])
            for t in recheck.trials} <= pids  # the same processes: the helper was reused
    trials = [r for r in all_runs(client) if r.data.tags.get("pipeline.kind") == "trial"]
    assert len(trials) == 8
    assert not [r for r in all_runs(client) if r.info.status == "RUNNING"]


def test_a_lone_worker_forks_nothing(tmp_path, empty_mlflow_db):
    """--workers 1: every trial in the launcher itself (in-process: no helper to fork)."""
    fresh_store(tmp_path, empty_mlflow_db)
    write_study(tmp_path, "one", STUDY.format(name="one", n_trials=3).replace(
        "    recheck: {top_k: 2, seeds: 2}\n", ""))
    result = run_search(tmp_path, "--study", str(tmp_path / "one.yaml"), "--workers", "1")
    assert result.code == 0, result.err
    assert {t.user_attrs[liveness.WORKER_ATTR] for t in load(tmp_path, "one").trials} == {
        liveness.worker_id()}  # this very process
