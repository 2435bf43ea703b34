"""The MLproject search entry points end to end: `mlflow run <copy of the repo> -e coarse_search`
then `-e fine_search`, as subprocesses in the current environment (`--env-manager local`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from search_fixtures import PARENT, REPO, RUN_STATUS, all_runs, children, load

PROJECT_FILES = ("MLproject", "conda.yaml", "pyproject.toml", "README.md", "pipeline", "studies")


@pytest.fixture(scope="module")
def mlflow_runs(tmp_path_factory, empty_mlflow_db):
    """Both entry points, run on a copy of the project (no .git, nothing written to the repo)."""
    root = tmp_path_factory.mktemp("mlproject")
    project = root / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, project / name)
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",  # see one_torch_thread
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")}
    done = {}
    # fine re-checks its 2 trials over 3 seeds itself (studies/fine.yaml); the recheck entry
    # point then adds a 4th seed for the best of them, in a run of its own.
    for entry, params in (("coarse_search", ["n_trials=3"]), ("fine_search", ["n_trials=2"]),
                          ("recheck", ["study=fine", "top_k=1", "seeds=4"]),
                          ("report", ["study=fine"])):
        done[entry] = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", str(project), "-e", entry,
             "--env-manager", "local", *(a for p in params for a in ("-P", p))],
            cwd=root, env=env, capture_output=True, text=True, timeout=500)
    return project, MlflowClient(tracking_uri=uri), done


def test_both_entry_points_succeed(mlflow_runs):
    _, _, done = mlflow_runs
    for entry, proc in done.items():
        assert proc.returncode == 0, f"{entry}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "succeeded" in proc.stderr


def test_the_run_mlflow_run_created_is_the_study_run(mlflow_runs):
    project, client, _ = mlflow_runs
    runs = all_runs(client)
    top = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs if PARENT not in r.data.tags}
    assert set(top) == {"coarse_search", "fine_search", "recheck", "report"}  # and no other
    for entry, key, n in (("coarse_search", "coarse", 3), ("fine_search", "fine", 2)):
        run = top[entry]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == key
        assert run.data.tags["pipeline.kind"] == "study"
        assert run.data.tags["pipeline.study"] == key
        assert run.data.params["n_trials"] == str(n)  # the entry point's own parameter ...
        assert run.data.params["study.n_trials"] == str(n)  # ... and the study's, side by side
        study = load(project, key)  # the journal lands in the project's working directory
        assert len(study.trials) == n
        latest = top["recheck"] if key == "fine" else run  # the study's latest execution
        assert study.user_attrs["mlflow_run_id"] == latest.info.run_id
        nested = [r for r in children(client, run.info.run_id)
                  if r.data.tags["pipeline.kind"] == "trial"]
        assert sorted(r.info.run_name for r in nested) == [f"{key}-{i:03d}" for i in range(n)]
        for t in study.trials:
            trial_run = client.get_run(t.user_attrs["mlflow_run_id"])
            assert trial_run.data.tags[PARENT] == run.info.run_id
            assert trial_run.info.status == RUN_STATUS[t.state]
        assert "pipeline.best_model_uri" in run.data.tags
    rechecks = [r for r in runs if r.data.tags.get("pipeline.kind") == "recheck"]
    assert len(runs) == 4 + 3 + 2 + len(rechecks)
    assert len(rechecks) == 2 * 3 + 1
    assert not any(r.info.status == "RUNNING" for r in runs)


def test_the_recheck_entry_point_nests_its_runs_in_its_own_run(mlflow_runs):
    project, client, _ = mlflow_runs
    runs = all_runs(client)
    top = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs if PARENT not in r.data.tags}
    fine_run, recheck_run = top["fine_search"], top["recheck"]
    assert recheck_run.info.status == "FINISHED"
    assert recheck_run.data.tags["pipeline.kind"] == "study"  # a new execution of the study
    assert recheck_run.data.tags["pipeline.study"] == "fine"
    (new,) = children(client, recheck_run.info.run_id)
    assert new.data.tags["pipeline.kind"] == "recheck" and new.info.status == "FINISHED"
    assert "pipeline.winner_trial" in fine_run.data.tags  # fine's own re-check: 2 x 3
    assert len([r for r in children(client, fine_run.info.run_id)
                if r.data.tags["pipeline.kind"] == "recheck"]) == 6
    complete = [t for t in load(project, "fine").trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: (-t.value, t.number)).number  # top_k=1: the best trial
    assert recheck_run.data.tags["pipeline.winner_trial"] == str(best) == \
        new.data.tags["pipeline.trial_number"]
    assert recheck_run.data.metrics["n_recheck_runs"] == 4  # the winner's four seeds
    assert len(load(project, "fine").trials) == 2  # no search trial was run


def test_fine_entry_point_narrowed_from_the_coarse_entry_point(mlflow_runs):
    project, client, _ = mlflow_runs
    fine = load(project, "fine")
    narrowing = fine.user_attrs["narrowing"]
    coarse_complete = {t.number for t in load(project, "coarse").trials
                       if t.state == TrialState.COMPLETE}
    assert narrowing["parent"] == "coarse"
    assert set(narrowing["trials"]) <= coarse_complete
    assert fine.trials[0].user_attrs["seeded_from"] == "coarse"


def test_the_report_entry_point_attaches_the_report_to_its_run_and_the_study_run(mlflow_runs):
    """`mlflow run . -e report`: the run MLflow makes for it holds the report and points at the
    study run it reports on (the latest execution of fine, the re-check's); that run has it
    too, as `python -m pipeline.report` leaves it."""
    project, client, done = mlflow_runs
    assert done["report"].returncode == 0, done["report"].stderr[-3000:]
    top = {r.data.tags["mlflow.project.entryPoint"]: r for r in all_runs(client)
           if PARENT not in r.data.tags}
    report_run, study_run = top["report"], top["recheck"]
    assert report_run.info.status == "FINISHED"
    assert report_run.data.tags["pipeline.kind"] == "report"
    assert report_run.data.tags["pipeline.study"] == "fine"
    assert report_run.data.tags["pipeline.study_run"] == study_run.info.run_id
    for run in (report_run, study_run):
        files = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
        assert {"report/index.html", "report/report.md", "report/recheck.png"} <= files
    assert (project / "reports" / "fine" / "index.html").is_file()
