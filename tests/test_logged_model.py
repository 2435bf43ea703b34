"""The best model as an MLflow PyTorch model (pipeline/tracking/models.py), logged on a real
SQLite store and loaded back."""

from __future__ import annotations

import mlflow.pytorch
import numpy as np
import torch
from mlflow.utils import requirements_utils

from pipeline.tracking.models import log_pytorch_model


def test_a_logged_model_pins_its_requirements_without_scanning_every_installed_package(
        mlflow_store, monkeypatch):
    """MLflow still checks the pins against this environment, by each pinned package's own
    version, not by first mapping every installed distribution (0.6-0.9 s per process)."""
    scans, checked = [], []
    real_scan = requirements_utils.importlib_metadata.packages_distributions
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # a fresh process
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions",
                        lambda: scans.append(1) or real_scan())
    real_version = requirements_utils._get_installed_version
    monkeypatch.setattr(requirements_utils, "_get_installed_version",
                        lambda package, module=None: checked.append(package)
                        or real_version(package, module))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    example = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    run = mlflow_store.create_run("0")

    uri = log_pytorch_model(mlflow_store, run.info.run_id, model, example)

    assert not scans
    assert set(checked) == {"mlflow", "torch"}  # the check ran, on both pins
    assert requirements_utils._MODULES_TO_PACKAGES is None  # left for a later caller to make
    requirements = mlflow.pyfunc.get_model_dependencies(uri)
    with open(requirements) as f:
        pins = {line.split("==")[0]: line.strip().split("==")[1] for line in f if "==" in line}
    assert pins == {"mlflow": mlflow.__version__, "torch": torch.__version__.split("+")[0]}
    loaded = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        assert torch.equal(loaded(torch.from_numpy(example)), model(torch.from_numpy(example)))
