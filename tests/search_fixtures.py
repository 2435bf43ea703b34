"""Helpers and fixtures shared by the search-stage tests (imported by those modules; kept apart
from conftest.py, which the training-foundation tests own).

Every search runs in-process through ``pipeline.search.main`` in its own tmp folder: the default
Optuna storage (``./optuna.journal``) and the MLflow store (``MLFLOW_TRACKING_URI``, an absolute
SQLite path, since MLflow caches stores by URI) both land there, never in the repository.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
PARENT = "mlflow.parentRunId"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Digits MLPs gain nothing from a second thread, and on a busy 2-core machine two threads
    per process made trials 20x slower (measured): keep the suite's runtime independent of
    whatever else the machine runs. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def worker_env(tracking_uri: str, **extra: str) -> dict:
    """The environment of a worker launched as a subprocess (``python -m pipeline.search``):
    this one without any inherited MLflow variable, the given tracking store, one OpenMP
    thread, and ``extra`` (credentials: services.MlflowServer.credentials)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", **extra}


def fresh_store(folder: Path, template: Path) -> MlflowClient:
    """A copy of conftest's empty store in ``folder`` (creating the schema costs seconds)."""
    shutil.copyfile(template, folder / "mlflow.db")
    return MlflowClient(tracking_uri=store_uri(folder))


def run_search(folder: Path, *argv: str) -> Outcome:
    """``python -m pipeline.search ARGV --quiet`` in-process, with cwd and MLflow store in
    ``folder``; returns the exit code and what it printed."""
    from pipeline.search.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(folder))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([*argv, "--quiet"])
            except SystemExit as stop:  # a flag argparse refused, as the command line exits
                code = stop.code
    return Outcome(code, out.getvalue(), err.getvalue())


def run_report(folder: Path, *argv: str, uri: str | None = None) -> Outcome:
    """``python -m pipeline.report ARGV`` in-process, cwd ``folder``, tracking store ``uri``
    (default: the store in ``folder``); returns the exit code and what it printed."""
    from pipeline.report import cli as report_cli

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri or store_uri(folder))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = report_cli.main(list(argv))
    return Outcome(code, out.getvalue(), err.getvalue())


def journal(folder: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))


def load(folder: Path, key: str) -> optuna.Study:
    return optuna.load_study(study_name=key, storage=journal(folder))


def study_names(folder: Path) -> list[str]:
    if not (folder / "optuna.journal").exists():
        return []
    return sorted(s.study_name for s in journal(folder).get_all_studies())


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              max_results=5000)


def study_runs(client: MlflowClient, key: str) -> list:
    return [r for r in all_runs(client) if r.data.tags.get("pipeline.kind") == "study"
            and r.data.tags.get("pipeline.study") == key]


def children(client: MlflowClient, run_id: str) -> list:
    return [r for r in all_runs(client) if r.data.tags.get(PARENT) == run_id]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every file under ``path`` of a run's artifacts, recursively."""
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def write_study(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN_STATUS = {  # trial state -> the status its MLflow run must have
    optuna.trial.TrialState.COMPLETE: "FINISHED",
    optuna.trial.TrialState.PRUNED: "KILLED",
    optuna.trial.TrialState.FAIL: "FAILED",
}
