"""The single-run CLI against a real SQLite MLflow store: what one run leaves in the store, how
bad input is refused, and the two ways it is started from outside (`python -m pipeline.train`
and `mlflow run`)."""

from __future__ import annotations

import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import TrainConfig
from pipeline.train import main
from pipeline.training.data import load_splits
from pipeline.training.models import build_model
from pipeline.training.trainer import evaluate

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--cycles", "1", "--step-size-epochs", "1", "--width", "16"]
TINY = TrainConfig(cycles=1, step_size_epochs=1, width=16)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("learning_curves.png", "confusion_matrix.png", "misclassified.png", "grad_norms.png")


def runs_in(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def exit_code(argv) -> int:
    """main's return value, or argparse's exit status for flags it rejects itself."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def expected_params(cfg: TrainConfig) -> dict[str, str]:
    return {k: "None" if v is None else str(v) for k, v in cfg.model_dump().items()}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, empty_mlflow_db):
    """One tiny run through main(), in-process, shared by the tests that inspect it."""
    root = tmp_path_factory.mktemp("cli-run")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        rc = main([*TINY_FLAGS, "--l2-lambda", "0.001", "--experiment", "smoke",
                   "--run-name", "tiny"])
    client = MlflowClient(tracking_uri=uri)
    runs = runs_in(client)
    files = root / "downloaded"
    files.mkdir()
    client.download_artifacts(runs[0].info.run_id, "", str(files))
    return SimpleNamespace(rc=rc, client=client, runs=runs, run=runs[0], files=files,
                           cfg=TINY.model_copy(update={"l2_lambda": 0.001}))


def test_cli_run_finishes_with_every_setting_as_a_param(logged_run):
    assert logged_run.rc == 0
    assert len(logged_run.runs) == 1
    run = logged_run.run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert logged_run.client.get_experiment(run.info.experiment_id).name == "smoke"
    assert run.data.params == expected_params(logged_run.cfg)
    assert run.data.tags["pipeline.kind"] == "train"
    assert run.data.tags["pipeline.diverged"] == "false"


def test_cli_run_logs_one_point_per_epoch_at_the_update_step(logged_run):
    history = logged_run.client.get_metric_history(logged_run.run.info.run_id, "val_acc")
    per_epoch = -(-len(load_splits("digits").x_train) // logged_run.cfg.batch_size)
    assert [m.step for m in history] == [per_epoch * e
                                         for e in range(1, logged_run.cfg.n_epochs + 1)]
    csv = pd.read_csv(logged_run.files / "history.csv")
    assert list(csv["step"]) == [m.step for m in history]
    assert list(csv["val_acc"]) == pytest.approx([m.value for m in history])
    for name in ("train_loss", "train_cost", "train_acc", "val_loss", "lr", "samples_per_sec",
                 "grad_norm/fc1", "grad_norm/out"):
        points = logged_run.client.get_metric_history(logged_run.run.info.run_id, name)
        assert len(points) == logged_run.cfg.n_epochs, name


def test_cli_run_final_metrics(logged_run):
    metrics = logged_run.run.data.metrics
    csv = pd.read_csv(logged_run.files / "history.csv")
    assert metrics["best_val_acc"] == pytest.approx(csv["val_acc"].max())
    assert metrics["n_params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert metrics["diverged"] == 0.0
    assert metrics["train_seconds"] > 0
    assert 0 <= metrics["test_acc"] <= 1


def test_cli_run_figures_are_valid_pngs(logged_run):
    for name in FIGURES:
        data = (logged_run.files / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and min(image.size) > 100, name


def test_cli_run_weights_reload_and_reproduce_the_test_accuracy(logged_run):
    cfg = TrainConfig(**json.loads((logged_run.files / "config.json").read_text()))
    assert cfg == logged_run.cfg
    state = torch.load(logged_run.files / "model" / "state_dict.pt", weights_only=True)
    splits = load_splits("digits")
    model = build_model(cfg, splits.input_shape, splits.n_classes)
    model.load_state_dict(state)  # strict: every key, every shape
    _, test_acc, _ = evaluate(model, splits.x_test, splits.y_test)
    assert test_acc == pytest.approx(logged_run.run.data.metrics["test_acc"])


@pytest.mark.parametrize("argv, mentions", [
    (["--width", "0", "--depth", "-1", "--eta-min", "0.5", "--eta-max", "0.1"],
     ["width", "depth", "eta_min"]),
    (["--optimizer", "sgdd"], ["--optimizer", "sgdd"]),
    (["--epochs", "2.5"], ["--epochs", "whole number"]),
    (["--dataset", "mnist", "--data-dir", "{tmp}/empty"], ["{tmp}/empty", "MNIST/raw"]),
])
def test_bad_input_exits_2_with_the_problems_and_creates_no_run(mlflow_store, tmp_path, capsys,
                                                                argv, mentions):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    for text in mentions:
        assert text.format(tmp=tmp_path) in err
    assert runs_in(mlflow_store) == []
    assert not (tmp_path / "mlruns").exists()


def test_diverged_run_is_finished_and_marked(mlflow_store, capsys):
    rc = main(["--schedule", "constant", "--lr", "10", "--l2-lambda", "10", "--epochs", "3",
               "--width", "16"])
    assert rc == 0
    assert "DIVERGED" in capsys.readouterr().out
    (run,) = runs_in(mlflow_store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.diverged"] == "true"
    assert run.data.metrics["diverged"] == 1.0
    names = {f.path for f in mlflow_store.list_artifacts(run.info.run_id)}
    assert set(FIGURES) <= names


def mlproject_entry(name: str) -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"][name]


def test_run_started_by_mlflow_run_adopts_it_despite_differently_spelled_params(mlflow_store,
                                                                               monkeypatch):
    """What `mlflow run . -e train -P eta_min=1e-4` does before our code starts: it creates the
    run, logs every entry-point parameter as the text given (defaults as str of the YAML value),
    and passes MLFLOW_RUN_ID. Our params must not clash with its '1e-4' (MLflow refuses to change
    a logged param), and the run must end FINISHED with the full configuration."""
    entry = mlproject_entry("train")
    given = {"cycles": "1", "step_size_epochs": "1", "width": "16", "eta_min": "1e-4"}
    values = {k: str(spec["default"]) for k, spec in entry["parameters"].items()} | given
    run_id = mlflow_store.create_run("0").info.run_id
    mlflow_store.log_batch(run_id, params=[Param(k, v) for k, v in values.items()])
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    argv = shlex.split(entry["command"].format(**values))
    assert argv[:3] == ["python", "-m", "pipeline.train"]

    assert main(argv[3:]) == 0

    (run,) = runs_in(mlflow_store)
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    assert set(TrainConfig.model_fields) <= set(run.data.params)
    assert float(run.data.params["eta_min"]) == 1e-4
    assert "best_val_acc" in run.data.metrics


# -- from outside: subprocesses --------------------------------------------------------------------


def test_python_m_pipeline_train_uses_mlflow_db_in_the_working_directory(tmp_path,
                                                                         subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *TINY_FLAGS, "--optimizer", "momentum",
         "--run-name", "from-shell"],
        cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best val acc" in proc.stdout
    assert (tmp_path / "mlflow.db").exists()  # MLflow's default store, next to the user
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = runs_in(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "from-shell"
    assert run.data.params["optimizer"] == "momentum"
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == TINY.n_epochs


def test_mlflow_run_train_entry_point_end_to_end(tmp_path, subprocess_env):
    project = tmp_path / "project"
    shutil.copytree(REPO, project, ignore=shutil.ignore_patterns(
        ".git", "tests", "__pycache__", "*.egg-info", "mlflow.db", "mlruns", "mlartifacts",
        ".pytest_cache", "data", "*.journal", "optuna.db"))
    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(project), "-e", "train", "--env-manager",
         "local", "-P", "cycles=1", "-P", "step_size_epochs=1", "-P", "width=16"],
        cwd=work, env={**subprocess_env, "MLFLOW_TRACKING_URI": uri}, capture_output=True,
        text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = runs_in(client)  # the run `mlflow run` created is the one we logged to
    assert run.info.status == "FINISHED"
    assert run.data.params["width"] == "16"
    assert set(TrainConfig.model_fields) <= set(run.data.params)
    assert {"best_val_acc", "test_acc", "n_params"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"model", "history.csv", "config.json", *FIGURES} <= names
