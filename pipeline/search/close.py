"""Closing a study run: the last worker out logs the summary and the best model, and ends it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from pipeline import names
from pipeline.config import TrainConfig
from pipeline.search import liveness, study_run
from pipeline.search.plan import Plan
from pipeline.search.summary import summarize
from pipeline.search.worker import budget_spent
from pipeline.tracking import client as tracking
from pipeline.training import checkpoint
from pipeline.training.data import splits_for


def close_study_run(client, run_id: str, plan: Plan, study, status: str, started: float) -> None:
    """The last worker out (of every launcher sharing the run) logs the study's summary and ends
    its run; the others leave it open. Last: no trial is running and, unless this worker is
    stopping early (failures, interrupt), the budget or the time is spent."""
    deadline = started + plan.cfg.timeout if plan.cfg.timeout else None

    def done(trials) -> bool:
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if plan.storage.kind == "rdb":  # heartbeats decide there, at the next start
            live = running
        else:
            live = [t for t in running
                    if liveness.is_alive(t.user_attrs.get(liveness.WORKER_ATTR))]
        return not live and (status != "FINISHED" or budget_spent(trials, plan.n_trials)
                             or (deadline is not None and time.time() > deadline))

    if not study_run.claim_close(plan.storage, study, run_id, done):
        return
    try:
        if status != "KILLED":
            summary = summarize(study.get_trials(deepcopy=False), plan.cfg.objective.direction)
            _log_summary(client, run_id, plan, summary)
            if summary["n_complete"] == 0 and summary["n_failed"] > 0:
                status = "FAILED"
    finally:
        tracking.end_run(client, run_id, status)


def _log_summary(client, run_id: str, plan: Plan, summary: dict) -> None:
    metrics = {"n_complete": summary["n_complete"], "n_pruned": summary["n_pruned"],
               "n_failed": summary["n_failed"]}
    best = summary.get("best")
    if best:
        metrics |= {"best_val_acc": best["value"], "best_trial": best["number"]}
        if best.get("test_acc") is not None:
            metrics["test_acc"] = best["test_acc"]
        tracking.log_params(client, run_id, {f"best.{k}": v for k, v in best["params"].items()})
        _log_best_model(client, run_id, plan, best)
    tracking.log_metrics(client, run_id, metrics)
    tracking.log_artifacts(client, run_id, {names.SUMMARY: json.dumps(summary, indent=2,
                                                                        default=str)})


RUN_END_WAIT = 120.0  # seconds


def _run_ended(client, run_id: str) -> bool:
    """Wait until a trial's run has ended. Its files are complete then: a trial's writes land
    in order, after its Optuna state, and its run's end is the last of them, so a study closed
    by another worker (scale-out) may find its best trial's files still on their way."""
    deadline = time.monotonic() + RUN_END_WAIT
    while client.get_run(run_id).info.status == "RUNNING":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _log_best_model(client, run_id: str, plan: Plan, best: dict) -> None:
    """The best trial's model as an MLflow PyTorch model (with signature) on the study run."""
    import tempfile

    from pipeline.tracking.models import log_pytorch_model
    from pipeline.training.models import build_model

    trial_run = best.get("mlflow_run_id")
    if not trial_run:
        return
    if not study_run.is_trial_run(client, trial_run, plan.key, best["number"]):
        print(f"[{plan.key}] warning: best model not logged: run {trial_run} is not a trial run "
              "this pipeline wrote for this study, and only those are loaded", file=sys.stderr)
        return
    if not _run_ended(client, trial_run):
        print(f"[{plan.key}] warning: best model not logged: run {trial_run} was still RUNNING "
              f"after {RUN_END_WAIT:g} s (its worker's writes had not all landed)",
              file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = client.download_artifacts(trial_run, names.CONFIG, tmp)
        weights = client.download_artifacts(trial_run, names.WEIGHTS, tmp)
        cfg = TrainConfig(**json.loads(Path(cfg_path).read_text()))
        splits = splits_for(cfg)
        model = build_model(cfg, splits.input_shape, splits.n_classes)
        try:
            model.load_state_dict(checkpoint.load_state_dict(weights))
        except checkpoint.UnsafeCheckpoint as err:
            print(f"[{plan.key}] warning: best model not logged: {err}", file=sys.stderr)
            return
    uri = log_pytorch_model(client, run_id, model, splits.x_val[:4].numpy())
    tracking.set_tags(client, run_id, {names.BEST_MODEL_URI: uri,
                                       names.BEST_TRIAL_RUN: trial_run})


def print_summary(plan: Plan, summary: dict) -> None:
    print(f"\n[{plan.key}] {summary['n_complete']} complete, {summary['n_pruned']} pruned, "
          f"{summary['n_failed']} failed (of {plan.n_trials} requested)")
    best = summary.get("best")
    if best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        test = best.get("test_acc")
        print(f"[{plan.key}] best trial {best['number']}: {plan.cfg.objective.metric} "
              f"{best['value']:.4f}" + (f", test_acc {test:.4f}" if test is not None else ""))
        print(f"[{plan.key}] best params: {params}")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
