"""Shared fixtures: an offline, isolated environment for every test, and small real stores.

Nothing here fakes a component: data comes from scikit-learn's embedded digits or from small files
written in the real on-disk formats, and MLflow runs against a real SQLite store in a tmp folder.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

# Test files that take longest (real servers, many searches), longest first: xdist hands whole
# files to its workers in collection order, so these go first and the many short files fill in
# around them (without this, a long file started last kept one core busy after the other had
# finished). Measured with `python -m pytest --durations=0`; the order changes no result.
LONGEST_FIRST = ("test_faults.py", "test_search_mlproject.py", "test_scaleout.py",
                 "test_recheck.py", "test_read_only.py", "test_run.py", "test_search_tree.py",
                 "test_search.py", "test_report.py", "test_bad_input.py",
                 "test_final_transfer.py", "test_catalogue.py", "test_gc_policy.py",
                 "test_tracking_writer.py", "test_search_e2e.py", "test_doctor.py",
                 "test_workers.py", "test_storage.py", "test_study.py")

MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
              "MLFLOW_EXPERIMENT_NAME")


def pytest_collection_modifyitems(items):
    """Longest files first (LONGEST_FIRST), the rest in their usual order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def offline_and_isolated(tmp_path_factory):
    """Session-wide (so module-scoped fixtures see it too): no downloads, no ~/.cache, no
    inherited MLflow run (the suite itself may run under `mlflow run`), and no dependence on the
    Debian Fashion-MNIST package that this machine happens to have and CI may not."""
    import pipeline.training.data

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_NO_DOWNLOAD", "1")
        # The suite runs test files in parallel, one per core: a search forks no helper workers
        # unless a test asks (--workers K, or PIPELINE_WORKERS), and runs its trials in order.
        mp.setenv("PIPELINE_WORKERS", "1")
        mp.setenv("PIPELINE_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
        for var in MLFLOW_ENV:
            mp.delenv(var, raising=False)
        mp.setattr(pipeline.training.data, "DEBIAN_FASHION_MNIST",
                   tmp_path_factory.mktemp("no-debian-package") / "fashion-mnist")
        yield


@pytest.fixture(scope="session")
def digits():
    """The digits splits every trainer test shares (read-only, like load_splits' own cache)."""
    from pipeline.training.data import load_splits

    return load_splits("digits")


@pytest.fixture
def fresh_splits_cache():
    """load_splits is lru_cache'd per process: tests that change what is on disk start clean."""
    from pipeline.training.data import load_splits

    load_splits.cache_clear()
    yield load_splits
    load_splits.cache_clear()


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """A real SQLite tracking store with its schema made once: creating the schema costs seconds,
    copying the file does not. (Default experiment's artifacts go under this folder.)"""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        MlflowClient(tracking_uri=f"sqlite:///{root / 'made.db'}").search_experiments()
    # The tests copy this file as it is. Once a pipeline client has put SQLite in WAL mode (a
    # process-wide hook), part of the schema can still sit in `made.db-wal`: take a consistent
    # snapshot into a file of its own, in rollback-journal mode, that a plain copy carries whole.
    src, dst = sqlite3.connect(root / "made.db"), sqlite3.connect(root / "mlflow.db")
    with src, dst:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
    src.close()
    dst.close()
    return root / "mlflow.db"


def new_store(folder: Path, template: Path) -> str:
    """A fresh copy of the empty store in `folder`; returns its tracking URI."""
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_mlflow_db):
    """An empty tracking store of our own in tmp_path, set as MLFLOW_TRACKING_URI, with cwd
    there too (MLflow puts a SQLite store's artifacts under ./mlruns of the working directory
    when it creates an experiment)."""
    from mlflow.tracking import MlflowClient

    uri = new_store(tmp_path, empty_mlflow_db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(tracking_uri=uri)


@pytest.fixture
def subprocess_env():
    """The test's environment (offline settings included, no inherited MLflow variables) with
    this interpreter first on PATH, so `python` in an MLproject command is the one running
    the tests."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
