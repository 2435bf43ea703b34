"""Trials whose worker died: failed, retried once with the same parameters, their runs KILLED.

Who decides that a RUNNING trial's worker is gone:

- RDB storages (SQLite, PostgreSQL): Optuna's heartbeats. A trial whose heartbeat is older than
  the grace period (storage.py) is failed by ``fail_stale_trials``, which calls the storage's
  callback, ``storage.retry_stale``: the trial is requeued once with the same parameters.
- journal files: Optuna 5 has no heartbeats there. The worker that claimed a trial is recorded
  on it (liveness.py); a trial whose process, on this machine, is gone is failed here and
  requeued by the same ``retry_stale``. A trial claimed on another machine is left alone.

Either way the trial's MLflow run, left RUNNING by the dead process, is marked KILLED. Used by
every start of a study (engine), by workers waiting for the last trials of others, and by
``pipeline.doctor --repair``.
"""

from __future__ import annotations

import socket
import warnings
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.search import liveness, storage as storage_mod
from pipeline.tracking import client as tracking

ERROR = "stale: its worker process died"


def fail_stale(study: optuna.Study, spec: storage_mod.StorageSpec, client) -> list[FrozenTrial]:
    """Fail (and requeue once) the trials whose worker is gone, KILL their runs; returns them."""
    if spec.kind == "memory":
        return []
    # Under the lock claims take (worker.claim_trial): between failing a trial and requeuing it,
    # a worker counting the budget would find one trial short and start a new one, and then the
    # retry would run too, one trial more than n_trials.
    if spec.kind == "rdb":
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return []
        with storage_mod.study_lock(spec, study.study_name), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            optuna.storages.fail_stale_trials(study)
            now = {t.number: t for t in study.get_trials(deepcopy=False)}
            # A trial that failed on its own in between carries its error; a stale one does not.
            stale = [now[t.number] for t in running if now[t.number].state == TrialState.FAIL
                     and "error" not in now[t.number].user_attrs]
            stale += _without_heartbeat(study, [now[t.number] for t in running
                                                if now[t.number].state == TrialState.RUNNING])
    else:
        with storage_mod.study_lock(spec, study.study_name):  # claims tag their worker inside
            stale = liveness.abandoned(study.get_trials(deepcopy=False,
                                                        states=(TrialState.RUNNING,)))
            for t in stale:
                study._storage.set_trial_user_attr(t._trial_id, "error", ERROR)
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                storage_mod.retry_stale(study, study._storage.get_trial(t._trial_id))
    for t in stale:
        # A worker that died before its trial's first epoch had not recorded the run's id yet
        # (the run is made off the trial's path, pipeline/tracking/writer.py): found by its tags.
        run_id = (t.user_attrs.get("mlflow_run_id")
                  or tracking.find_trial_run(client, study.study_name, t.number))
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            tracking.end_run(client, run_id, "KILLED")
    return stale


def _never_beat(trial: FrozenTrial) -> bool:
    """A worker killed between taking a trial and its first heartbeat (a few milliseconds)
    leaves a trial that heartbeats never fail: on this machine, it is stale once its process is
    gone and twice the grace period has passed since it started."""
    grace = storage_mod._seconds("PIPELINE_GRACE_SECONDS", storage_mod.GRACE_SECONDS)
    worker = trial.user_attrs.get(liveness.WORKER_ATTR)
    return bool(worker) and not liveness.is_alive(worker) and trial.datetime_start is not None \
        and (datetime.now() - trial.datetime_start).total_seconds() > 2 * grace


def _without_heartbeat(study: optuna.Study, running: list[FrozenTrial]) -> list[FrozenTrial]:
    storage, out = study._storage, []
    for t in filter(_never_beat, running):
        try:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process got there first
        storage_mod.retry_stale(study, storage.get_trial(t._trial_id))
        out.append(t)
    return out


def stale_trials(study: optuna.Study, spec: storage_mod.StorageSpec) -> list[FrozenTrial]:
    """What ``fail_stale`` would fail now, without failing it (for pipeline.doctor)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if spec.kind == "journal":
        return liveness.abandoned(running)
    if spec.kind != "rdb" or not running:
        return []
    # Optuna's own test for a silent heartbeat (private, but the one fail_stale_trials uses).
    ids = set(study._storage._get_stale_trial_ids(study._study_id))
    return [t for t in running if t._trial_id in ids or _never_beat(t)]


def watched(trials: list[FrozenTrial], spec: storage_mod.StorageSpec) -> list[FrozenTrial]:
    """RUNNING trials whose worker's death ``fail_stale`` can detect: all of them on an RDB
    storage (heartbeats), those claimed on this machine on a journal file."""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if spec.kind == "rdb":
        return running
    if spec.kind == "journal":
        here = socket.gethostname()
        return [t for t in running
                if t.user_attrs.get(liveness.WORKER_ATTR, "").rsplit(":", 2)[0] == here]
    return []
