"""One MLflow run per execution of a study, shared by every worker on every machine.

The first worker to start creates the study run and records its id in the Optuna study (user
attribute ``mlflow_run_id``); a worker that starts while that run is open joins it, so all trial
runs nest under one study run however many launchers, on however many machines, work on the
study. The worker that finds nothing left to do closes it, once: it records the id in
``mlflow_run_closed`` and then logs the summary and the final status. A later launch (to top the
study up, say) opens a new run: each execution is its own run. Both decisions are taken under
the storage's study lock (a PostgreSQL advisory lock, or a file lock), so racing launchers agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from pipeline import names
from pipeline.search import storage as storage_mod
from pipeline.tracking import client as tracking

OPEN = "mlflow_run_id"
CLOSED = "mlflow_run_closed"


def open_run(client: MlflowClient, experiment_id: str, spec: storage_mod.StorageSpec, study,
             name: str, tags: Mapping[str, str]) -> tuple[str, bool]:
    """Join the study's open run, or create it. Returns (run id, created)."""
    key = study.study_name
    with storage_mod.study_lock(spec, key):
        attrs = study.user_attrs
        run_id = attrs.get(OPEN)
        created = not (run_id and attrs.get(CLOSED) != run_id and _usable(client, run_id))
        if created:
            # Under `mlflow run`, the run it made (MLFLOW_RUN_ID) becomes the study run.
            run_id = tracking.start_run(client, experiment_id, name, tags=tags,
                                        adopt_env_run=True)
            study.set_user_attr(OPEN, run_id)
        elif (env_run := os.environ.get("MLFLOW_RUN_ID")) and env_run != run_id:
            # A joining `mlflow run` launch: its own run points at the shared one.
            tracking.set_tags(client, env_run, {names.KIND: names.KIND_WORKER, names.STUDY: key,
                                                names.STUDY_RUN: run_id})
        _kill_orphans(client, key, spec.url, keep={run_id, attrs.get(CLOSED)})
    return run_id, created


def _usable(client: MlflowClient, run_id: str) -> bool:
    """The recorded run is in this tracking store and not deleted."""
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # another tracking store, or deleted for good
        return False


def _kill_orphans(client: MlflowClient, key: str, storage_url: str, keep: set) -> None:
    """Study runs left RUNNING by a killed process: only the open run may be RUNNING (and the
    run being closed), since every run is opened under the lock."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(
            experiments, filter_string=names.where((names.STUDY, key),
                                                     (names.KIND, names.KIND_STUDY))
            + " and attributes.status = 'RUNNING'"):
        if (run.info.run_id not in keep
                and run.data.tags.get(names.OPTUNA_STORAGE, storage_url) == storage_url):
            tracking.end_run(client, run.info.run_id, "KILLED")


def claim_close(spec: storage_mod.StorageSpec, study, run_id: str,
                done: Callable[[list[FrozenTrial]], bool]) -> bool:
    """True for exactly one caller: the first to find ``done(trials)`` while the run is open."""
    with storage_mod.study_lock(spec, study.study_name):
        attrs = study.user_attrs
        if attrs.get(OPEN) != run_id:
            return True  # nobody else can have joined a run the study does not name
        if attrs.get(CLOSED) == run_id or not done(study.get_trials(deepcopy=False)):
            return False
        study.set_user_attr(CLOSED, run_id)
        return True


def is_trial_run(client: MlflowClient, run_id: str, key: str, number: int) -> bool:
    """Whether ``run_id`` is the run this pipeline wrote for trial ``number`` of study ``key``,
    nested under one of the study's runs: the only runs whose files the pipeline loads back."""
    try:
        tags = client.get_run(run_id).data.tags
        parent = client.get_run(tags.get("mlflow.parentRunId", "")).data.tags
    except Exception:  # no such run (or parent) in this store
        return False
    return (tags.get(names.KIND) == names.KIND_TRIAL and tags.get(names.STUDY) == key
            and tags.get(names.TRIAL_NUMBER) == str(number)
            and parent.get(names.KIND) == names.KIND_STUDY and parent.get(names.STUDY) == key)
