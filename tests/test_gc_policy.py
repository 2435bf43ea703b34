"""The garbage-collector policy of processes started to run a study (pipeline/gc_policy.py)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest

from pipeline import gc_policy
from search_fixtures import fresh_store, run_search, write_study


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


def test_the_search_command_runs_its_trials_with_start_up_frozen(tmp_path):
    """`python -m pipeline.search`: paused from the entry point to the worker loop."""
    probe = (
        "import gc, runpy, sys\n"
        "from pipeline import engine\n"
        "seen = []\n"
        "run = engine.objective.run_trial\n"
        "def spy(*a):\n"
        "    seen.append((gc.isenabled(), gc.get_freeze_count()))\n"
        "    return run(*a)\n"
        "engine.objective.run_trial = spy\n"
        "sys.argv = ['pipeline.search'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('pipeline.search', run_name='__main__')\n"
        "finally:\n"
        "    print('SEEN', seen[0][0], seen[0][1] > 100_000, len(seen))\n")
    write_study(tmp_path, "tiny", json.dumps({
        "name": "tiny", "sampler": {"name": "random", "seed": 0}, "n_trials": 2,
        "fixed": {"schedule": "constant", "epochs": 1, "batch_size": 64},
        "space": {"width": {"type": "int", "low": 8, "high": 16}}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    out = subprocess.run([sys.executable, "-c", probe, "--study", str(tmp_path / "tiny.yaml"),
                          "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "SEEN True True 2" in out.stdout, out.stdout + out.stderr
