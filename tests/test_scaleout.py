"""Many workers on one study, as on many machines: separate `python -m pipeline.search`
launches (not `--workers` children of one launcher) started together against one Optuna storage
and one MLflow tracking store.

- PostgreSQL for the study and a real `mlflow server` (PostgreSQL backend, proxied artifacts)
  for the runs, both on 127.0.0.1 (tests/services.py): the set-up of docs/scaling-out.md;
- the default journal file and a SQLite tracking store: several processes on one machine.

Either way: exactly n_trials trials with unique numbers, one MLflow run per trial, nested under
the one study run that the first launcher created and the others joined, run status mirroring
the trial state, and nothing left RUNNING.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from search_fixtures import PARENT, RUN_STATUS, store_uri, worker_env, write_study
from services import ADMIN, WORKER, MlflowServer, mlflow_server, postgres  # noqa: F401

WORKERS = 4
N_TRIALS = 8
LAUNCH_SECONDS = 420  # a guard against a hang (4 cold starts on 2 cores), not a speed target


def tiny_study(folder, name: str):
    """Digits, two short epochs, one thread: a second a trial even with 4 launchers on 2 cores."""
    body = {"name": name, "sampler": {"name": "random", "seed": 0}, "n_trials": N_TRIALS,
            "pruner": {"name": "median", "options": {"n_startup_trials": 2}},
            "fixed": {"schedule": "constant", "epochs": 2, "batch_size": 64, "threads": 1},
            "space": {"width": {"type": "int", "low": 8, "high": 32},
                      "lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}}}
    return write_study(folder, name, json.dumps(body))  # JSON is YAML


def launch_workers(folder, study_path, env: dict, *storage: str) -> list:
    """WORKERS separate launches started at once; returns (pid, exit code, stdout, stderr)."""
    command = [sys.executable, "-m", "pipeline.search", "--study", str(study_path), *storage,
               "--quiet"]
    procs = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(WORKERS)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=LAUNCH_SECONDS)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a worker launch was still running after "
                        f"{LAUNCH_SECONDS} s:\n{proc.communicate()[1][-3000:]}")
        results.append((proc.pid, proc.returncode, out, err))
    return results


def check_one_study(study: optuna.Study, client: MlflowClient, results: list) -> None:
    for pid, code, _out, err in results:
        assert code == 0, f"worker {pid} exited {code}:\n{err[-3000:]}"
    trials = study.trials
    assert len(trials) == N_TRIALS
    assert sorted(t.number for t in trials) == list(range(N_TRIALS))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # each worker samples with its own seed: no point of the continuous space drawn twice
    assert len({tuple(sorted(t.params.items())) for t in trials}) == N_TRIALS
    # every trial was claimed by one of the launched processes
    pids = {int(t.user_attrs["worker"].rsplit(":", 2)[1]) for t in trials}
    assert pids <= {pid for pid, *_ in results}

    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    study_runs = [r for r in runs if r.data.tags.get("pipeline.kind") == "study"]
    (study_run,) = study_runs  # one, however many launchers raced to create it
    sid = study_run.info.run_id
    assert study_run.data.tags["pipeline.study"] == study.study_name
    assert study.user_attrs["mlflow_run_id"] == sid
    assert study.user_attrs["mlflow_run_closed"] == sid  # closed once, by the last worker
    assert study_run.info.status == "FINISHED"
    assert (study_run.data.metrics["n_complete"] + study_run.data.metrics["n_pruned"]
            == N_TRIALS)

    trial_runs = [r for r in runs if r.info.run_id != sid]
    assert len(trial_runs) == N_TRIALS  # one run per trial, and no other run
    assert {r.data.tags.get(PARENT) for r in trial_runs} == {sid}
    assert (sorted(int(r.data.tags["pipeline.trial_number"]) for r in trial_runs)
            == list(range(N_TRIALS)))
    by_id = {r.info.run_id: r for r in trial_runs}
    for t in trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["pipeline.trial_number"] == str(t.number)
        assert run.info.status == RUN_STATUS[t.state]
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    # the last worker out logged the best model on the study run
    assert "pipeline.best_model_uri" in study_run.data.tags


def test_workers_on_many_machines_share_a_postgres_study_and_a_tracking_server(
        postgres, mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    """docs/scaling-out.md's set-up: the workers' account (a non-admin may not write to the Default
    experiment, so the first worker creates the study's experiment) and PostgreSQL storage."""
    storage = postgres.createdb("optuna")
    path = tiny_study(tmp_path, "scaleout")
    env = worker_env(mlflow_server.uri, MLFLOW_EXPERIMENT_NAME="scaleout",
                     **MlflowServer.credentials(WORKER))
    results = launch_workers(tmp_path, path, env, "--storage", storage)
    study = optuna.load_study(study_name="scaleout", storage=storage)
    for k, v in MlflowServer.credentials(ADMIN).items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    check_one_study(study, client, results)
    assert {r.info.experiment_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])} == {
        client.get_experiment_by_name("scaleout").experiment_id}
    # optuna-dashboard users follow each trial to its run page on the server
    exp_id = client.get_experiment_by_name("scaleout").experiment_id
    for t in study.trials:
        assert t.user_attrs["mlflow_run_url"] == (
            f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{t.user_attrs['mlflow_run_id']}"
            "?workflowType=machine_learning")
    # the server stored the artifacts in its own destination, not in the workers' folder
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    assert any(p.name == "state_dict.pt" for p in mlflow_server.artifacts.rglob("*"))


def test_workers_on_one_machine_share_the_journal_file_and_a_sqlite_store(tmp_path):
    """No store yet: the launchers also race to create the SQLite store's tables."""
    path = tiny_study(tmp_path, "onebox")
    results = launch_workers(tmp_path, path, worker_env(store_uri(tmp_path)))  # ./optuna.journal
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal")))
    check_one_study(optuna.load_study(study_name="onebox", storage=storage), client, results)


def test_the_tracking_server_refuses_the_unauthenticated_and_foreign_host_names(
        postgres, mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    """What makes docs/scaling-out.md's server safe to reach from other machines: no password, no
    access (a worker stops at its start with exit code 2, nothing created); and a Host header
    outside --allowed-hosts (DNS rebinding) is refused even with a password."""
    from pipeline.search.cli import main

    storage = postgres.createdb("refused")
    path = tiny_study(tmp_path, "refused")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # and no credentials
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--study", str(path), "--storage", storage, "--quiet"])
    assert code == 2, err.getvalue()
    assert "cannot use the MLflow tracking store" in err.getvalue()
    assert "401" in err.getvalue()
    assert "refused" not in optuna.get_all_study_names(storage)

    def status(host: str) -> int:
        token = base64.b64encode(":".join(ADMIN).encode()).decode()
        request = urllib.request.Request(
            f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host, "Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status("tracking.example.org") == 200
    assert status("attacker.example") == 403


def test_one_open_study_run_joined_until_closed_and_orphans_ended(tmp_path, mlflow_store):
    """study_run's rules on one store, step by step: join while open, close once, then anew."""
    from pipeline.search import storage as storage_mod, study_run

    spec = storage_mod.parse_storage(str(tmp_path / "s.journal"))
    study = optuna.create_study(study_name="s", storage=storage_mod.open_storage(spec))
    tags = {"pipeline.kind": "study", "pipeline.study": "s", "pipeline.optuna_storage": spec.url}
    orphan = mlflow_store.create_run("0", tags=tags).info.run_id  # a killed launcher's run

    first, created = study_run.open_run(mlflow_store, "0", spec, study, "s", tags)
    assert created and mlflow_store.get_run(orphan).info.status == "KILLED"
    assert study_run.open_run(mlflow_store, "0", spec, study, "s", tags) == (first, False)

    assert study_run.claim_close(spec, study, first, lambda trials: True)
    assert not study_run.claim_close(spec, study, first, lambda trials: True)  # once only
    second, created = study_run.open_run(mlflow_store, "0", spec, study, "s", tags)
    assert created and second != first
    assert mlflow_store.get_run(first).info.status == "RUNNING"  # its closer is still logging
    assert not study_run.claim_close(spec, study, second, lambda trials: False)
