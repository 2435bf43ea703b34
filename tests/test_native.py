"""Feeling native in MLflow and Optuna: a named model-training experiment, context tags and
dataset inputs on every run, the link to the runs, and optuna-dashboard (started for real on
the study's journal) naming the objective. `mlflow ui` itself is queried in
test_search_tree.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from search_fixtures import (
    all_runs,
    free_port,
    fresh_store,
    one_torch_thread,
    run_search,
    study_runs,
    write_study,
)

from pipeline import names
from pipeline.tracking import context, spool

assert one_torch_thread  # autouse: one torch thread in this module

KEY = "native"


@pytest.fixture(scope="module")
def native(tmp_path_factory, empty_mlflow_db):
    folder = tmp_path_factory.mktemp("native")
    client = fresh_store(folder, empty_mlflow_db)
    body = {"name": KEY, "sampler": {"name": "random", "seed": 0}, "n_trials": 2,
            "fixed": {"schedule": "constant", "epochs": 2, "batch_size": 64, "threads": 1},
            "space": {"width": {"type": "int", "low": 8, "high": 32}},
            "recheck": {"top_k": 1, "seeds": 2}}
    write_study(folder, KEY, json.dumps(body))
    result = run_search(folder, "--study", str(folder / f"{KEY}.yaml"))
    assert result.code == 0, result.out + result.err
    return folder, client, result


def test_runs_land_in_a_named_model_training_experiment(native):
    _, client, result = native
    exp = client.get_experiment_by_name("pipeline-digits")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = all_runs(client)
    assert {r.info.experiment_id for r in runs} == {exp.experiment_id}
    link = f"#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    assert f"[{KEY}] runs in MLflow: http://127.0.0.1:5000/{link}" in result.out
    assert "mlflow ui" in result.out.splitlines()[-1]  # and how to open it


def test_every_run_says_where_it_came_from_and_what_it_read(native):
    _, client, _ = native
    for run in all_runs(client):
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
        assert len(tags["mlflow.source.git.commit"]) == 40  # the pipeline's code
        if tags[names.KIND] in (names.KIND_TRIAL, names.KIND_RECHECK):
            inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
            assert sorted(inputs) == ["testing", "training", "validation"]
            assert json.loads(inputs["testing"].profile)["num_rows"] == 360  # digits' test split
            assert inputs["training"].name == "digits-train"
    digests = {i.dataset.digest for r in all_runs(client) if r.inputs
               for i in r.inputs.dataset_inputs if i.dataset.name == "digits-train"}
    assert len(digests) == 1  # the same split, the same digest


def test_experiment_name_follows_mlflow_conventions(tmp_path, monkeypatch, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    default = context.resolve_experiment(client, None, "fashion-mnist")
    assert client.get_experiment(default).name == "pipeline-fashion-mnist"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    mine = context.resolve_experiment(client, None, "digits")
    assert client.get_experiment(mine).name == "mine"
    assert context.resolve_experiment(client, "given", "digits") != mine  # --experiment wins
    old = client.create_experiment("old")  # an experiment made elsewhere gets the kind tag
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", old)  # as under `mlflow run`
    assert context.resolve_experiment(client, "given", "digits") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_links_open_the_model_training_view():
    assert context.runs_link("http://tracking.example.org:5000/", "7") == \
        "http://tracking.example.org:5000/#/experiments/7?workflowType=machine_learning"
    assert context.server_run_link("https://t.example.org", "7", "abc") == \
        "https://t.example.org/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert context.server_run_link("sqlite:///mlflow.db", "7", "abc") is None
    local = context.runs_link("sqlite:////elsewhere/mlflow.db", "3")
    assert "--backend-store-uri sqlite:////elsewhere/mlflow.db" in local


def test_dataset_inputs_survive_the_spool(tmp_path):
    """A store that is away keeps a run's inputs on disk and writes them back as they were."""
    from pipeline.config import TrainConfig
    from pipeline.training.data import splits_for

    cfg = TrainConfig()
    inputs = context.dataset_inputs(splits_for(cfg), cfg)
    spool.keep(tmp_path, "log_inputs", "run1", {"datasets": inputs})

    class Recorder:
        def log_inputs(self, run_id, datasets):
            self.got = (run_id, datasets)

    recorder = Recorder()
    assert spool.replay(recorder, "run1", tmp_path) == (1, "run1")
    run_id, back = recorder.got
    assert run_id == "run1"
    assert [context.input_to_plain(d) for d in back] == [context.input_to_plain(d)
                                                          for d in inputs]


@pytest.fixture
def dashboard(native):
    folder = native[0]
    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), "optuna.journal", "--host", "127.0.0.1", "--port",
                             str(port)], cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "optuna-dashboard exited"
            try:
                urllib.request.urlopen(f"{base}/api/studies", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_optuna_dashboard_names_the_objective(dashboard, native):
    _, client, _ = native
    studies = {s["study_name"]: s["study_id"] for s in _get(f"{dashboard}/api/studies")
               ["study_summaries"]}
    assert set(studies) == {KEY, f"{KEY}-recheck"}
    for name, study_id in studies.items():
        detail = _get(f"{dashboard}/api/studies/{study_id}?after=0")
        assert detail["objective_names"] == ["val_acc"], name  # not "Objective 0"
    trials = _get(f"{dashboard}/api/studies/{studies[KEY]}?after=0")["trials"]
    run_ids = {a["value"] for t in trials for a in t["user_attrs"] if a["key"] == "mlflow_run_id"}
    assert run_ids == {r.info.run_id for r in all_runs(client)
                       if r.data.tags[names.KIND] == names.KIND_TRIAL}
    # a local store has no URL to follow; a tracking server's run page is recorded instead
    assert not [a for t in trials for a in t["user_attrs"] if a["key"] == "mlflow_run_url"]
    assert study_runs(client, KEY)
