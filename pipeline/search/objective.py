"""One trial: sample parameters, train, and keep MLflow's child run in step with the trial.

Run status mirrors the trial: complete -> FINISHED, pruned -> KILLED, failed -> FAILED (with
``error.txt``). Trial and run point at each other: the run id is a trial user attribute and the
trial number a run tag. Epoch metrics are buffered and written in a few batches per trial, since
one SQLite write costs milliseconds and a digits epoch costs about as much.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass

import optuna
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.search import space, transfer
from pipeline.search.studyfile import StudyConfig
from pipeline.search.summary import budget_spent
from pipeline.tracking import client as tracking, context
from pipeline.training import artifacts
from pipeline.training.data import splits_for
from pipeline.training.trainer import EpochRecord, train


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one study execution shares."""

    study: StudyConfig
    study_key: str  # the Optuna study name (study name, with dataset / smoke suffixes)
    space: dict  # name -> spec (pydantic), after narrowing
    experiment_id: str
    study_run_id: str
    seed: int  # sampler seed; trial seeds derive from it
    source: transfer.Source | None = None  # a transfer study's source, resolved

    def run(self, trial: optuna.Trial, client) -> tuple[optuna.trial.TrialState, float | None]:
        """One trial of the search (the worker loop calls this)."""
        return run_trial(self, trial, client)

    def spent(self, trials, n_trials: int) -> bool:
        """Whether the worker loop should claim no more trials."""
        return budget_spent(trials, n_trials)

    def claimed(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Called under the study lock with each trial a worker claims (nothing to add here)."""

    def plan_of(self, plan):
        """The plan a spawned worker runs these trials under: the study's own."""
        return plan


def trial_seed(study_seed: int, number: int) -> int:
    """A training seed per trial, derived from the study's seed (both are logged)."""
    return (study_seed * 1_000_003 + number) % 2**31


class _RunLink:
    """Records the trial's run id on the trial. The run is made by the writer process while the
    trial trains (``tracking.start_run_later``): its id is recorded at the first epoch that
    finds it made, and waited for when the trial ends. A worker killed before that leaves a run
    found by its tags (stale.py, doctor.py); a store that is away stops the study when the trial
    ends, with the run's creation and writes kept in the spool."""

    def __init__(self, trial: optuna.Trial, client, pending: str, experiment_id: str):
        self.trial, self.client, self.pending = trial, client, pending
        self.experiment_id = experiment_id
        self.done = False

    def record(self, wait: bool) -> None:
        if self.done:
            return
        run_id = self.client.run_id(self.pending, wait=wait)
        if run_id is None:
            if wait:  # the writer's own error follows from client.check() (engine)
                raise tracking.TrackingUnavailable(
                    f"the MLflow run of trial {self.trial.number} could not be created")
            return
        self.trial.set_user_attr("mlflow_run_id", run_id)
        if url := context.server_run_link(self.client.tracking_uri, self.experiment_id, run_id):
            self.trial.set_user_attr("mlflow_run_url", url)  # optuna-dashboard shows it
        self.done = True


class _EpochLogger:
    """Per-epoch callback: records the trial's run id once it exists, writes metrics to MLflow
    in batches (with the run's params in the first; tracking.EpochWriter), reports to the
    pruner."""

    def __init__(self, client: MlflowClient, run_id: str, trial: optuna.Trial, metric: str,
                 params: dict, link: _RunLink):
        self.trial, self.metric, self.link = trial, metric, link
        self.writer = tracking.EpochWriter(client, run_id, params=params)
        self.seconds = 0.0  # spent here, inside train(): orchestration, not training

    def __call__(self, record: EpochRecord) -> None:
        t0 = time.perf_counter()
        try:
            self._on_epoch(record)
        finally:
            self.seconds += time.perf_counter() - t0

    def _on_epoch(self, record: EpochRecord) -> None:
        self.link.record(wait=False)
        self.writer(record)
        if record.diverged:
            raise optuna.TrialPruned(f"diverged at epoch {record.epoch} (non-finite loss)")
        self.trial.report(record.metrics[self.metric], record.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record.epoch}")

    def flush(self, final: dict | None = None, final_step: int = 0,
              tags: dict | None = None) -> None:
        """Write what is buffered (and the final metrics and tags) in one batch."""
        self.writer.flush(final, final_step, tags)


def run_trial(ctx: TrialContext, trial: optuna.Trial, client: MlflowClient
              ) -> tuple[optuna.trial.TrialState, float | None]:
    """Train one trial and log it; returns the state and value to tell the study."""
    params = space.suggest(trial, ctx.space)
    # A trial requeued because its worker died (stale.py) trains exactly as its original did.
    retry_of = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
    seed = ctx.study.fixed.get("seed", trial_seed(ctx.seed, trial.number if retry_of is None
                                                  else retry_of))
    tags = {names.KIND: names.KIND_TRIAL, names.STUDY: ctx.study_key,
            names.TRIAL_NUMBER: str(trial.number)}
    if retry_of is not None:
        tags[names.RETRY_OF] = str(retry_of)
    return train_logged(ctx, trial, client, f"{ctx.study_key}-{trial.number:03d}", tags, params,
                        defaults={"seed": seed}, logged={"trial_number": trial.number})


def train_logged(ctx: TrialContext, trial: optuna.Trial, client: MlflowClient, run_name: str,
                 tags: dict, params: dict, defaults: dict | None = None,
                 overrides: dict | None = None, logged: dict | None = None
                 ) -> tuple[optuna.trial.TrialState, float | None]:
    """Train ``params`` (over the study's fixed settings: ``defaults`` below them, ``overrides``
    above) as an MLflow child run of the study run, in step with ``trial``; returns the state
    and value to tell the study. ``logged``: extra params of the run."""
    # The writer process makes the run while this one trains; until it exists the run is
    # named by a pending id (writes may already use it).
    run_id = tracking.start_run_later(client, ctx.experiment_id, run_name, ctx.study_run_id,
                                      {**context.context_tags(), **tags})
    link = _RunLink(trial, client, run_id, ctx.experiment_id)
    logger = None
    logged = logged or {}
    try:
        inherited = transfer.trial_settings(ctx.source,
                                            {**ctx.study.fixed, **params}.get("transfer"))
        cfg = ctx.study.train_config({**(defaults or {}), **params, **inherited,
                                      **(overrides or {})})
        splits = splits_for(cfg)
        client.log_inputs(run_id, context.dataset_inputs(splits, cfg))
        logger = _EpochLogger(client, run_id, trial, ctx.study.objective.metric,
                              {**params, **cfg.model_dump(), **logged}, link)
        t_train = time.perf_counter()
        try:
            result = train(cfg, splits, on_epoch=logger)
        finally:  # training time, pruned trials included; the callback's own time excluded
            trial.set_user_attr("train_seconds",
                                time.perf_counter() - t_train - logger.seconds)
        value = _objective_value(result, ctx.study.objective)
        final = {**result.final_metrics(), "objective": value}
        logger.flush(final, result.history[-1].step)
        tracking.log_artifacts(client, run_id,
                               artifacts.training_artifacts(result, splits, with_figures=False))
        trial.set_user_attr("test_acc", final["test_acc"])
        tracking.end_run(client, run_id, "FINISHED")
        return optuna.trial.TrialState.COMPLETE, value
    except optuna.TrialPruned as pruned:
        logger.flush(tags={names.PRUNED: str(pruned)})
        trial.set_user_attr("pruned_reason", str(pruned))
        tracking.end_run(client, run_id, "KILLED")
        return optuna.trial.TrialState.PRUNED, None
    except Exception:
        text = traceback.format_exc()
        if logger is not None:
            logger.flush()
        else:  # failed before training started: still record what was sampled
            tracking.log_params(client, run_id, {**params, **logged})
        trial.set_user_attr("error", text.strip().splitlines()[-1][:500])
        tracking.log_artifacts(client, run_id, {names.ERROR: text})
        tracking.end_run(client, run_id, "FAILED")
        return optuna.trial.TrialState.FAIL, None
    except BaseException:  # Ctrl-C / SIGTERM: the trial ends, its run is KILLED
        if logger is not None:
            with contextlib.suppress(Exception):  # its curves so far, if the store answers
                logger.flush()
        tracking.end_run(client, run_id, "KILLED")
        raise
    finally:  # the run's id, if no epoch found it made (the engine reports a store gone)
        with contextlib.suppress(tracking.TrackingUnavailable):
            link.record(wait=True)


def _objective_value(result, objective) -> float:
    """The best value of the objective metric over training (validation, never test)."""
    values = [r.metrics[objective.metric] for r in result.history if objective.metric in r.metrics]
    return max(values) if objective.direction == "maximize" else min(values)
