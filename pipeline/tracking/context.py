"""What makes runs feel native in `mlflow ui`: a named model-training experiment, the context tags
MLflow's fluent API would add (source, git commit, user), datasets as run inputs, and links.

- Experiment: ``--experiment`` / ``MLFLOW_EXPERIMENT_NAME``, else ``pipeline-<dataset>`` (one per
  dataset: runs on different data are not comparable); under ``mlflow run``, MLflow's
  ``MLFLOW_EXPERIMENT_ID``. Tagged ``mlflow.experimentKind=custom_model_development``, the
  value the UI uses for training experiments.
- Context tags: MLflow's own resolution (``context.registry.resolve_tags``), once per process.
- Datasets: each training run logs its train, validation and test splits as ``mlflow.data``
  inputs (name, digest, source, schema, split sizes as the profile, context), the digests
  computed once per process for a given split (hashing 150 MB of Fashion-MNIST takes a while;
  a trial takes this from a cache).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
DATA_CONTEXT = "mlflow.data.context"  # MLflow's input tag for how a dataset was used
SPLITS = (("train", "training"), ("val", "validation"), ("test", "testing"))


def default_experiment(dataset: str) -> str:
    return f"pipeline-{dataset}"


def resolve_experiment(client: MlflowClient, name: str | None = None,
                       dataset: str = "digits") -> str:
    """The experiment id (see the module docstring), created and tagged when missing."""
    if exp_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):  # set by `mlflow run`
        _tag_kind(client, client.get_experiment(exp_id))
        return exp_id
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or default_experiment(dataset)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except Exception:  # another worker created it between our two calls
            exp = client.get_experiment_by_name(name)
    _tag_kind(client, exp)
    return exp.experiment_id


def _tag_kind(client: MlflowClient, exp) -> None:
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) is None:
            try:
                client.set_experiment_tag(exp.experiment_id, key, value)
            except Exception:  # a read-only account may not tag: the runs still land there
                pass


def runs_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to look: the experiment's runs (or one run) in the model-training view, on the
    tracking server, or on a local `mlflow ui` (with the command that starts it)."""
    page = (f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
            + "?workflowType=machine_learning")
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    here = Path("mlflow.db").resolve()
    default = tracking_uri.startswith("sqlite:///") and \
        Path(tracking_uri.removeprefix("sqlite:///")).resolve() == here
    store = "" if default else f" --backend-store-uri {tracking_uri}"
    return f"http://127.0.0.1:5000/{page} (after: mlflow ui{store} --host 127.0.0.1 --port 5000)"


def server_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """A run's page on a tracking server; None for a local store (no URL to follow)."""
    if tracking_uri.startswith(("http://", "https://")):
        return runs_link(tracking_uri, experiment_id, run_id)
    return None


@functools.cache
def context_tags() -> dict[str, str]:
    """The tags MLflow's fluent API adds to a run (source name and type, git commit, user)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_commit
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = {k: str(v) for k, v in resolve_tags().items()
            if k.startswith("mlflow.") and k != "mlflow.runName"}
    # MLflow looks for the commit beside the entry script; when that is not in the package's
    # repository (a script or notebook calling the pipeline), the code that trains is.
    if MLFLOW_GIT_COMMIT not in tags and (commit := get_git_commit(Path(__file__).parent)):
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def with_context(tags: dict) -> dict:
    """``tags`` and MLflow's context tags for a run made here; a run `mlflow run` made
    (MLFLOW_RUN_ID) has its own, which name the project, so it gets ``tags`` alone."""
    return dict(tags) if os.environ.get("MLFLOW_RUN_ID") else {**context_tags(), **tags}


_DIGESTS: dict[tuple, str] = {}


def _digest(splits, part: str) -> str:
    key = (id(splits), part)
    if key not in _DIGESTS:
        x, y = getattr(splits, f"x_{part}"), getattr(splits, f"y_{part}")
        h = hashlib.blake2b(digest_size=8)
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def dataset_inputs(splits, cfg) -> list[DatasetInput]:
    """The run's splits (train, validation, test) as MLflow dataset inputs: name, digest,
    source (how the split was drawn), schema, split size as the profile, and context."""
    out = []
    for part, context in SPLITS:
        n = len(getattr(splits, f"y_{part}"))
        if n == 0:  # a final run: no validation split
            continue
        shape = list(getattr(splits, f"x_{part}").shape[1:])
        source = {"dataset": cfg.dataset, "loader": "pipeline.training.data",
                  "data_dir": cfg.data_dir, "data_seed": cfg.data_seed,
                  "val_fraction": cfg.val_fraction, "n_per_class": cfg.n_per_class,
                  "resize": cfg.resize, "train_on": cfg.train_on}
        schema = {"mlflow_tensorspec": {
            "features": json.dumps([{"type": "tensor", "tensor-spec": {
                "dtype": "float32", "shape": [-1, *shape]}}]),
            "targets": json.dumps([{"type": "tensor", "tensor-spec": {
                "dtype": "int64", "shape": [-1]}}])}}
        profile = {"num_rows": n, "classes": splits.n_classes}
        dataset = Dataset(f"{cfg.dataset}-{part}", _digest(splits, part), "code",
                          json.dumps(source), json.dumps(schema), json.dumps(profile))
        out.append(DatasetInput(dataset, [InputTag(DATA_CONTEXT, context)]))
    return out


def input_to_plain(item: DatasetInput) -> dict:
    """A dataset input as JSON (the spool keeps writes as JSON lines)."""
    d = item.dataset
    return {"name": d.name, "digest": d.digest, "source_type": d.source_type,
            "source": d.source, "schema": d.schema, "profile": d.profile,
            "tags": {t.key: t.value for t in item.tags}}


def input_from_plain(plain: dict) -> DatasetInput:
    return DatasetInput(Dataset(plain["name"], plain["digest"], plain["source_type"],
                                plain["source"], plain["schema"], plain["profile"]),
                        [InputTag(k, v) for k, v in plain["tags"].items()])
