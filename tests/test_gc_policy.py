"""The garbage-collector policy of processes started to run a study (pipeline/gc_policy.py)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys

import pytest
from search_fixtures import fresh_store, run_search, write_study

from pipeline import gc_policy


@pytest.fixture
def collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if enabled else gc.disable()
    gc_policy._paused = False


def test_pause_then_resume_freezes_what_exists_and_collects_again(collector_restored):
    gc.unfreeze()
    gc_policy.pause()
    assert not gc.isenabled()
    held = [[i] for i in range(1000)]  # long-lived objects made during start-up
    gc_policy.resume_frozen()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(held)
    gc_policy.resume_frozen()  # once only
    assert gc.isenabled()


def test_resume_does_nothing_unless_this_process_paused(collector_restored):
    gc.unfreeze()
    gc_policy.resume_frozen()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()  # somebody else's choice is left alone
    gc_policy.pause()
    gc_policy.resume_frozen()
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_a_study_run_in_process_leaves_the_callers_collector_as_it_was(tmp_path, empty_mlflow_db,
                                                                       collector_restored):
    fresh_store(tmp_path, empty_mlflow_db)
    write_study(tmp_path, "tiny", json.dumps({
        "name": "tiny", "sampler": {"name": "random", "seed": 0}, "n_trials": 1,
        "fixed": {"schedule": "constant", "epochs": 1, "batch_size": 64},
        "space": {"width": {"type": "int", "low": 8, "high": 16}}}))
    frozen = gc.get_freeze_count()
    assert run_search(tmp_path, "--study", str(tmp_path / "tiny.yaml")).code == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen


TINY = {"name": "tiny", "sampler": {"name": "random", "seed": 0}, "n_trials": 3,
        "fixed": {"schedule": "constant", "epochs": 1, "batch_size": 64},
        "space": {"width": {"type": "int", "low": 8, "high": 16}}}

# Runs an entry point as `python -m` does, with a spy on one function that records the
# collector's state when it is called: (enabled, more than 100,000 objects frozen).
PROBE = """
import gc, importlib, runpy, sys
module, name, entry = sys.argv[1:4]
target = importlib.import_module(module)
seen, real = [], getattr(target, name)
def spy(*a, **k):
    seen.append((gc.isenabled(), gc.get_freeze_count() > 100_000))
    return real(*a, **k)
setattr(target, name, spy)
sys.argv = [entry] + sys.argv[4:]
try:
    runpy.run_module(entry, run_name="__main__", alter_sys=True)
finally:
    print("SEEN", seen)
"""


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, empty_mlflow_db):
    """`python -m pipeline.search` on a tiny study, `python -m pipeline.report` on it, and one
    `python -m pipeline.train` run."""
    folder = tmp_path_factory.mktemp("gc")
    write_study(folder, "tiny", json.dumps(TINY))
    shutil.copyfile(empty_mlflow_db, folder / "mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}

    def probe(*argv):
        return subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)

    search = probe("pipeline.search.objective", "run_trial", "pipeline.search",
                   "--study", str(folder / "tiny.yaml"), "--quiet")
    report = probe("os", "fork", "pipeline.report", "--study", "tiny")  # figure workers
    train = probe("pipeline.tracking.training_run", "train", "pipeline.train", "--depth", "1",
                  "--width", "8", "--cycles", "1")
    return folder, search, report, train


def test_the_search_command_runs_its_trials_with_start_up_frozen(cli_runs):
    """From the entry point to the worker loop the collector is paused; the trials run with
    it collecting again and start-up's objects frozen."""
    _, search, _, _ = cli_runs
    assert search.returncode == 0, search.stderr
    assert "SEEN [(True, True), (True, True), (True, True)]" in search.stdout, (
        search.stdout + search.stderr)
    assert "[I " not in search.stderr  # Optuna's own INFO lines: ours say it per trial


def test_the_report_command_forks_its_figure_workers_with_start_up_frozen(cli_runs):
    folder, _, report, _ = cli_runs
    assert report.returncode == 0, report.stderr
    seen = report.stdout.split("SEEN ")[-1].strip()
    assert seen.startswith("[(True, True)") and "False" not in seen, report.stdout + report.stderr
    # three trials: importance is computed (an in-memory Optuna study, which says nothing)
    assert "[I " not in report.stderr, report.stderr
    pngs = {p.name for p in (folder / "reports" / "tiny").glob("*.png")}
    assert {"history.png", "top_curves.png", "confusion.png", "importance.png"} <= pngs


def test_the_train_command_trains_with_start_up_frozen(cli_runs):
    *_, train = cli_runs
    assert train.returncode == 0, train.stderr
    assert "SEEN [(True, True)]" in train.stdout, train.stdout + train.stderr
