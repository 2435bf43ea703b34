"""The MLflow tree a real coarse -> fine run leaves (the shipped study files, digits, fewer
trials), checked from the store, and then through `mlflow ui`'s REST API.

One module-scoped run is shared by every test here: coarse with 10 trials, then fine with 6.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState
from search_fixtures import (
    PARENT,
    RUN_STATUS,
    STUDIES,
    all_runs,
    artifact_paths,
    children,
    free_port,
    fresh_store,
    load,
    one_torch_thread,
    run_search,
    store_uri,
    study_runs,
)
from services import NO_JOB_RUNNER

from pipeline.config import TrainConfig
from pipeline.search.studyfile import load_study

assert one_torch_thread  # an autouse fixture, imported to apply to this module

N_COARSE, N_FINE = 10, 6
TRIAL_FILES = {"history.csv", "config.json", "confusion_matrix.csv", "test_predictions.npy",
               "model/state_dict.pt"}
EPOCH_METRICS = ("train_loss", "train_cost", "train_acc", "val_loss", "val_cost", "val_acc", "lr",
                 "samples_per_sec", "epoch")


@pytest.fixture(scope="module")
def tree(tmp_path_factory, empty_mlflow_db):
    folder = tmp_path_factory.mktemp("tree")
    client = fresh_store(folder, empty_mlflow_db)
    coarse = run_search(folder, "--study", "coarse", "--n-trials", str(N_COARSE))
    fine = run_search(folder, "--study", "fine", "--n-trials", str(N_FINE))
    assert coarse.code == 0, coarse.err
    assert fine.code == 0, fine.err
    return folder, client, {"coarse": coarse, "fine": fine}


@pytest.fixture(scope="module")
def client(tree):
    return tree[1]


@pytest.fixture(scope="module")
def studies(tree):
    return {key: load(tree[0], key) for key in ("coarse", "fine")}


@pytest.fixture(scope="module")
def study_run(client):
    out = {}
    for key in ("coarse", "fine"):
        (run,) = study_runs(client, key)
        out[key] = run
    return out


def download(client, run_id, path) -> Path:
    return Path(client.download_artifacts(run_id, path))


def trial_pairs(client, studies):
    for key, study in studies.items():
        for t in study.trials:
            yield key, t, client.get_run(t.user_attrs["mlflow_run_id"])


# -- the shape of the tree ------------------------------------------------------------------------


def test_one_study_run_per_study_and_every_other_run_nested_under_one(client, study_run, studies):
    runs = all_runs(client)
    n_rechecks = int(study_run["fine"].data.metrics["n_recheck_runs"])  # studies/fine.yaml's
    assert n_rechecks == 5 * 3  # its 5 best trials over 3 fresh seeds
    assert len(runs) == 2 + N_COARSE + N_FINE + n_rechecks
    top = [r for r in runs if PARENT not in r.data.tags]
    assert {r.info.run_id for r in top} == {r.info.run_id for r in study_run.values()}
    for key, run in study_run.items():
        assert run.info.run_name == key
        assert run.info.status == "FINISHED"
        assert run.data.tags["pipeline.kind"] == "study"
        assert run.data.tags["pipeline.study"] == key
        assert len(children(client, run.info.run_id)) == len(studies[key].trials) + (
            n_rechecks if key == "fine" else 0)
        assert studies[key].user_attrs["mlflow_run_id"] == run.info.run_id
    assert study_run["fine"].data.tags["pipeline.parent_study"] == "coarse"
    assert study_run["coarse"].data.tags["pipeline.parent_study"] == ""
    assert len(studies["coarse"].trials) == N_COARSE and len(studies["fine"].trials) == N_FINE


def test_each_trial_run_is_named_tagged_and_linked_both_ways(client, studies, study_run):
    for key, t, run in trial_pairs(client, studies):
        assert run.data.tags[PARENT] == study_run[key].info.run_id
        assert run.info.run_name == f"{key}-{t.number:03d}"
        assert run.data.tags["pipeline.trial_number"] == str(t.number)
        assert run.data.tags["pipeline.kind"] == "trial"
        assert run.data.tags["pipeline.study"] == key


def test_run_status_mirrors_the_trial_state(client, studies):
    seen = set()
    for _, t, run in trial_pairs(client, studies):
        assert run.info.status == RUN_STATUS[t.state], (t.number, t.state)
        seen.add(t.state)
    assert TrialState.COMPLETE in seen
    assert not any(r.info.status == "RUNNING" for r in all_runs(client))


def test_every_training_setting_is_a_param_of_each_trial_run(client, studies):
    for key, t, run in trial_pairs(client, studies):
        params = run.data.params
        assert set(TrainConfig.model_fields) <= set(params)
        for name, value in t.params.items():
            assert float(params[name]) == pytest.approx(value, rel=1e-12)
        for name, value in load_study(key).fixed.items():
            assert params[name] == str(value)
        assert params["dataset"] == "digits"
        assert params["trial_number"] == str(t.number)
        # the trial's training seed derives from the sampler seed (0): 0 * 1_000_003 + number
        assert params["seed"] == str(t.number)


# -- per-epoch metrics ----------------------------------------------------------------------------


def n_epochs(key, t) -> int:
    cfg = load_study(key)
    cycles = t.params.get("cycles", cfg.fixed.get("cycles"))
    return 2 * cfg.fixed["step_size_epochs"] * cycles


def test_step_metrics_one_point_per_epoch_at_increasing_steps(client, studies, digits):
    per_epoch = math.ceil(len(digits.x_train) / 32)  # batch_size 32 in both study files
    for key, t, run in trial_pairs(client, studies):
        history = client.get_metric_history(run.info.run_id, "val_acc")
        epochs = n_epochs(key, t) if t.state == TrialState.COMPLETE else len(t.intermediate_values)
        assert [m.step for m in history] == [per_epoch * e for e in range(1, epochs + 1)]
        # the pruner heard the same values, epoch by epoch
        assert [m.value for m in history] == pytest.approx(
            [t.intermediate_values[e] for e in range(1, epochs + 1)])
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(max(m.value for m in history))  # best epoch
        for name in EPOCH_METRICS:
            assert len(client.get_metric_history(run.info.run_id, name)) == epochs, name


# -- artifacts ------------------------------------------------------------------------------------


def test_complete_trial_runs_carry_their_artifacts(client, studies, digits):
    for key, t, run in trial_pairs(client, studies):
        if t.state != TrialState.COMPLETE:
            continue
        run_id = run.info.run_id
        assert TRIAL_FILES <= artifact_paths(client, run_id)
        history = pd.read_csv(download(client, run_id, "history.csv"))
        assert len(history) == n_epochs(key, t)
        assert list(history["val_acc"]) == pytest.approx(
            [m.value for m in client.get_metric_history(run_id, "val_acc")])
        config = TrainConfig(**json.loads(download(client, run_id, "config.json").read_text()))
        assert config == load_study(key).train_config({"seed": t.number, **t.params})
        pred = np.load(download(client, run_id, "test_predictions.npy"), allow_pickle=False)
        assert pred.shape == (len(digits.y_test),)
        test_acc = float((pred == digits.y_test.numpy()).mean())
        assert test_acc == pytest.approx(run.data.metrics["test_acc"])
        assert test_acc == pytest.approx(t.user_attrs["test_acc"])
        cm = pd.read_csv(download(client, run_id, "confusion_matrix.csv"), index_col=0).to_numpy()
        assert cm.shape == (10, 10) and cm.sum() == len(digits.y_test)
        assert np.trace(cm) / cm.sum() == pytest.approx(test_acc)
        state = torch.load(download(client, run_id, "model/state_dict.pt"), weights_only=True)
        assert "out.weight" in state


def test_study_runs_carry_study_file_space_and_summary(client, study_run, studies):
    for key, run in study_run.items():
        run_id = run.info.run_id
        files = artifact_paths(client, run_id)
        assert {"study.yaml", "search_space.json", "summary.json"} <= files
        assert download(client, run_id, "study.yaml").read_text() == \
            (STUDIES / f"{key}.yaml").read_text()
        space = json.loads(download(client, run_id, "search_space.json").read_text())
        assert space == studies[key].user_attrs["space"]
        summary = json.loads(download(client, run_id, "summary.json").read_text())
        assert summary["n_trials"] == len(studies[key].trials)
        assert summary["best"]["number"] == studies[key].best_trial.number
    assert "narrowing.json" not in artifact_paths(client, study_run["coarse"].info.run_id)
    assert "narrowing.json" in artifact_paths(client, study_run["fine"].info.run_id)
    # coarse searches exactly what its file says
    coarse_file = yaml.safe_load((STUDIES / "coarse.yaml").read_text())["space"]
    coarse_space = studies["coarse"].user_attrs["space"]
    assert set(coarse_space) == set(coarse_file)
    for name, spec in coarse_file.items():
        assert spec.items() <= coarse_space[name].items()


def test_study_run_params_and_summary_metrics(client, study_run, studies):
    for key, run in study_run.items():
        study, cfg = studies[key], load_study(key)
        m, p = run.data.metrics, run.data.params
        assert m["n_complete"] + m["n_pruned"] + m["n_failed"] == len(study.trials)
        assert m["n_complete"] == sum(t.state == TrialState.COMPLETE for t in study.trials)
        assert m["best_val_acc"] == pytest.approx(study.best_value)
        assert m["best_trial"] == study.best_trial.number
        assert m["test_acc"] == pytest.approx(study.best_trial.user_attrs["test_acc"])
        for name, value in study.best_trial.params.items():
            assert float(p[f"best.{name}"]) == pytest.approx(value, rel=1e-12)
        assert p["study.sampler"] == cfg.sampler.name
        assert p["study.sampler_seed"] == str(cfg.sampler.seed)
        assert p["study.pruner"] == cfg.pruner.name
        assert p["study.n_trials"] == str(len(study.trials))
        for name, value in cfg.fixed.items():
            assert p[f"fixed.{name}"] == str(value)
    assert study_run["fine"].data.params["study.parent"] == "coarse"


def test_best_model_loads_and_predicts_like_the_best_trial(client, study_run, digits, tree,
                                                           monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tree[0]))
    for run in study_run.values():
        uri = run.data.tags["pipeline.best_model_uri"]
        assert run.data.tags["pipeline.best_trial_run"] == \
            client.get_run(run.data.tags["pipeline.best_trial_run"]).info.run_id
        model = mlflow.pytorch.load_model(uri)
        with torch.no_grad():
            out = model(digits.x_test)
            assert tuple(model(digits.x_test[:1]).shape) == (1, 10)
        assert tuple(out.shape) == (len(digits.y_test), 10)
        accuracy = (out.argmax(1) == digits.y_test).float().mean().item()
        model_run = client.get_run(run.data.tags["pipeline.best_trial_run"])  # with a re-check:
        assert accuracy == pytest.approx(model_run.data.metrics["test_acc"])  # the winner's


# -- narrowing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrowing(client, study_run):
    return json.loads(download(client, study_run["fine"].info.run_id, "narrowing.json")
                      .read_text())


def test_narrowing_record_new_bounds_within_the_coarse_space_but_widened_edges(narrowing,
                                                                              studies):
    coarse_space = studies["coarse"].user_attrs["space"]
    fixed = load_study("fine").fixed
    assert narrowing["parent"] == "coarse"
    # fine fixes cycles (longer training), so cycles leaves the space
    assert set(narrowing["params"]) == set(coarse_space) - set(fixed)
    for name, rec in narrowing["params"].items():
        old, new = rec["old"], rec["new"]
        assert old == coarse_space[name]
        assert new["low"] < new["high"]
        for side, past in (("low", float.__lt__), ("high", float.__gt__)):
            edge = rec["edges"].get(side, {})
            if edge.get("change", "").startswith("widened"):  # a crowded edge: past coarse's
                assert rec["boundary"] == side and past(float(new[side]), float(old[side]))
                assert (edge["old"], edge["new"]) == (old[side], new[side])
            else:  # narrowed, within coarse's range
                assert not past(float(new[side]), float(old[side]))
        assert new["low"] <= min(rec["best_values"]) <= max(rec["best_values"]) <= new["high"]
        assert narrowing["space"][name] == new
        assert rec["boundary"] in (None, "low", "high")
    assert narrowing["space"]["depth"]["high"] <= 8  # fine.yaml's limit
    assert narrowing["space"]["eta_min"]["high"] <= narrowing["space"]["eta_max"]["low"]
    assert studies["fine"].user_attrs["space"] == narrowing["space"]


def test_narrowing_used_the_best_completed_coarse_trials(narrowing, studies):
    coarse = studies["coarse"]
    complete = [t for t in coarse.trials if t.state == TrialState.COMPLETE]
    by_number = {t.number: t for t in coarse.trials}
    assert narrowing["k"] == min(5, len(complete))  # fine.yaml: top_k 5
    assert len(narrowing["trials"]) == narrowing["k"]
    assert all(by_number[n].state == TrialState.COMPLETE for n in narrowing["trials"])
    values = [by_number[n].value for n in narrowing["trials"]]
    assert values == narrowing["values"] == sorted(values, reverse=True)
    assert values == sorted((t.value for t in complete), reverse=True)[:narrowing["k"]]
    for name, rec in narrowing["params"].items():
        assert rec["best_values"] == pytest.approx(
            [by_number[n].params[name] for n in narrowing["trials"]])
    assert narrowing["rule"]["margin"] == 0.25 and narrowing["rule"]["top_k"] == 5
    assert studies["fine"].user_attrs["narrowing"]["trials"] == narrowing["trials"]


def test_boundary_flags_are_tagged_on_the_fine_run(narrowing, study_run, tree):
    tags = {k.removeprefix("pipeline.boundary."): v
            for k, v in study_run["fine"].data.tags.items() if k.startswith("pipeline.boundary.")}
    assert tags == narrowing["boundary_flags"]
    assert narrowing["boundary_flags"] == {n: r["boundary"] for n, r in narrowing["params"].items()
                                           if r["boundary"]}
    for name, edge in tags.items():
        assert f"{name}'s best values crowd the {edge} edge" in tree[2]["fine"].out


def test_fine_starts_with_the_parent_best_configurations_clipped_into_its_space(
        narrowing, studies):
    coarse = {t.number: t for t in studies["coarse"].trials}
    fine, space = studies["fine"].trials, narrowing["space"]
    n_seeded = min(3, narrowing["k"])  # fine.yaml: enqueue 3
    for i, number in enumerate(narrowing["trials"][:n_seeded]):
        expected = {}
        for name, spec in space.items():  # clipped by hand into the new space
            v = min(max(coarse[number].params[name], spec["low"]), spec["high"])
            expected[name] = int(round(v)) if spec["type"] == "int" else v
        assert fine[i].params == pytest.approx(expected, rel=1e-12)
        assert fine[i].user_attrs["seeded_from"] == "coarse"
    assert all("seeded_from" not in t.user_attrs for t in fine[n_seeded:])
    for t in fine:  # every fine trial samples inside the narrowed space
        for name, spec in space.items():
            assert spec["low"] <= t.params[name] <= spec["high"]
        assert "cycles" not in t.params


# -- the same tree through `mlflow ui` ------------------------------------------------------------


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def ui(tree, tmp_path_factory):
    """`mlflow ui` started plainly in the folder the studies ran in, as the README says: with no
    tracking URI it reads ./mlflow.db there. Only 127.0.0.1, one worker process (the default 4
    each import MLflow's server: slow to start on 2 cores); stopped (its whole process group,
    which this fixture started) at teardown."""
    folder = tree[0]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | NO_JOB_RUNNER
    log = (tmp_path_factory.mktemp("ui") / "ui.log").open("w")
    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    proc = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"mlflow ui exited: {Path(log.name).read_text()}"
            try:
                if _get(f"{base}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /health: {Path(log.name).read_text()}"
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.parametrize("api", ["api", "ajax-api"])  # REST clients, and the UI's own calls
def test_mlflow_ui_lists_study_runs_with_their_trials_nested(ui, api, studies, study_run):
    status, page = _get(f"{ui}/")
    assert status == 200 and "<html" in page.lower()
    (exp,) = [e for e in _post(f"{ui}/{api}/2.0/mlflow/experiments/search",
                               {"max_results": 100})["experiments"]
              if e["name"] == "pipeline-digits"]  # a named experiment, one per dataset
    # tagged as a model-training experiment, the kind the UI opens on training runs
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == \
        "custom_model_development"
    runs = _post(f"{ui}/{api}/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            for r in runs}
    names = {r["info"]["run_id"]: r["info"]["run_name"] for r in runs}
    top = sorted(names[i] for i, t in tags.items() if PARENT not in t)
    assert top == ["coarse", "fine"]
    for key, run in study_run.items():
        sid = run.info.run_id
        assert tags[sid]["pipeline.kind"] == "study"
        nested = sorted(names[i] for i, t in tags.items()
                        if t.get(PARENT) == sid and t["pipeline.kind"] == "trial")
        assert nested == [f"{key}-{t.number:03d}" for t in studies[key].trials]
    rechecks = [i for i, t in tags.items() if t["pipeline.kind"] == "recheck"]
    assert len(rechecks) == int(study_run["fine"].data.metrics["n_recheck_runs"]) > 0
    assert len(runs) == 2 + N_COARSE + N_FINE + len(rechecks)
    for r in runs:  # where each run came from, as MLflow's fluent API would have said
        t = tags[r["info"]["run_id"]]
        assert t["mlflow.source.type"] == "LOCAL" and t["mlflow.user"]
        assert t["mlflow.source.name"]  # the entry script (here: the test process's own)
        assert len(t["mlflow.source.git.commit"]) == 40
        if t["pipeline.kind"] in ("trial", "recheck"):  # the Dataset column
            inputs = r["inputs"]["dataset_inputs"]
            contexts = {i["tags"][0]["value"]: i["dataset"] for i in inputs}
            assert set(contexts) == {"training", "validation", "testing"}
            assert contexts["training"]["name"] == "digits-train"
            assert len(contexts["training"]["digest"]) == 16
            profile = json.loads(contexts["validation"]["profile"])
            assert profile["num_rows"] == 288  # digits: 20 % of the 1,437 training images
    # a trial's runs are found by the same filter the UI uses to expand a parent
    sid = study_run["fine"].info.run_id
    found = _post(f"{ui}/{api}/2.0/mlflow/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{sid}'"})["runs"]
    assert len(found) == N_FINE + len(rechecks)
