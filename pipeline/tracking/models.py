"""A trained network as an MLflow PyTorch model on a run (the ``Models`` tab of `mlflow ui`).

Kept apart from ``client`` because it runs the network (torch) to infer the model's signature,
and the report, which reads through ``client``, imports no torch.
"""

from __future__ import annotations

import contextlib

import numpy as np
from mlflow.tracking import MlflowClient

MODEL_NAME = "model"


def log_pytorch_model(client: MlflowClient, run_id: str, model, example: np.ndarray) -> str:
    """Log ``model`` on the run, with the signature and input example of ``example`` (a few
    inputs); returns its ``models:/`` URI.

    The logged model is created by id in the run's experiment, so nothing goes through MLflow's
    global active-run stack (see client.py). pt2 (torch.export) is MLflow's safe format: loading
    it executes no pickled code."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model.eval()
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id=experiment_id, name=MODEL_NAME,
                                        source_run_id=run_id)
    with _no_installed_package_scan():
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, signature=signature,
            input_example=example.astype(np.float32), serialization_format="pt2",
            model_id=logged.model_id, run_id=run_id,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


@contextlib.contextmanager
def _no_installed_package_scan():
    """MLflow checks a model's pip requirements against this environment (a warning on a
    mismatch). Before the first check in a process it maps every installed distribution to its
    modules, reading every installed file's record: 0.6-0.9 s with this project's
    dependencies, in every process that closes a study. The map only helps find the version of
    a requirement that is not an installed distribution; ours are torch and mlflow, both
    installed, and their versions are still checked. So the map starts empty here, and is
    left unmade afterwards, for any later caller to make in full. An MLflow that keeps it
    elsewhere is left to its own way."""
    from mlflow.utils import requirements_utils as req

    if getattr(req, "_MODULES_TO_PACKAGES", ...) is not None:
        yield
        return
    req._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        req._MODULES_TO_PACKAGES = None
