"""Closing a study run: the last worker out logs the summary and the best model, and ends it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from pipeline import names
from pipeline.config import TrainConfig
from pipeline.search import liveness, rank, study_run
from pipeline.search.plan import Plan, study_flags
from pipeline.search.summary import budget_spent, summarize
from pipeline.tracking import client as tracking
from pipeline.training import checkpoint
from pipeline.training.data import splits_for


def _live(plan: Plan, trials) -> list:
    """Trials still being trained by a live worker."""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if plan.storage.kind == "rdb":  # heartbeats decide there, at the next start
        return running
    return [t for t in running if liveness.is_alive(t.user_attrs.get(liveness.WORKER_ATTR))]


def close_study_run(client, run_id: str, plan: Plan, study, status: str, started: float,
                    stage=None) -> None:
    """The last worker out (of every launcher sharing the run) logs the study's summary and ends
    its run; the others leave it open. Last: no trial is running (search or re-check) and,
    unless this worker is stopping early (failures, interrupt), the budget or the time is spent
    and the re-check (``stage``, pipeline.search.recheck) has run every pair."""
    deadline = started + plan.cfg.timeout if plan.cfg.timeout else None
    stopping = status != "FINISHED"

    def done(trials) -> bool:
        if _live(plan, trials):
            return False
        if stage is not None:
            checks = stage.study.get_trials(deepcopy=False)
            if _live(stage.plan, checks) or not (stopping or stage.ctx.spent(checks, 0)):
                return False
        return (stopping or plan.recheck_only or budget_spent(trials, plan.n_trials)
                or (deadline is not None and time.time() > deadline))

    if not study_run.claim_close(plan.storage, study, run_id, done):
        return
    try:
        if status != "KILLED":
            trials = study.get_trials(deepcopy=False)
            summary = summarize(trials, plan.cfg.objective.direction)
            verdict = stage.verdict(trials) if stage is not None else None
            if verdict is not None and verdict["winner"] is not None:
                summary["recheck"] = verdict
                _log_verdict(client, run_id, plan, verdict, trials)
            _log_summary(client, run_id, plan, summary, model=verdict is None
                         or verdict["winner"] is None)
            if summary["n_complete"] == 0 and summary["n_failed"] > 0:
                status = "FAILED"
    finally:
        tracking.end_run(client, run_id, status)


def _log_verdict(client, run_id: str, plan: Plan, verdict: dict, trials) -> None:
    """The re-check's winner on the study run: tag, metrics, the full verdict, and its model."""
    win = verdict["ranking"][0]
    metrics = {names.WINNER_VAL_MEAN: win["val_mean"], names.WINNER_VAL_STD: win["val_std"],
               names.WINNER_TEST_MEAN: win["test_mean"], names.WINNER_TEST_STD: win["test_std"],
               names.WINNER_VAL_CI_LOW: win["val_ci_low"],
               names.WINNER_VAL_CI_HIGH: win["val_ci_high"],
               names.N_RECHECK_RUNS: verdict["n_runs"],
               names.SELECTION_OPTIMISM: verdict["selection_optimism"],
               "recheck_seconds": verdict["seconds"], "recheck_epochs": verdict["epochs"]}
    if diff := verdict.get("difference"):
        metrics |= {"winner_vs_runner_up": diff["mean"],
                    "winner_vs_runner_up_ci_low": diff["ci_low"],
                    "winner_vs_runner_up_ci_high": diff["ci_high"]}
    tracking.log_metrics(client, run_id, metrics)
    tracking.set_tags(client, run_id, {names.WINNER_TRIAL: str(verdict["winner"])})
    tracking.log_artifacts(client, run_id, {names.RECHECK: json.dumps(verdict, indent=2,
                                                                       default=str)})
    trial = next(t for t in trials if t.number == verdict["winner"])
    tracking.log_params(client, run_id, {f"winner.{k}": v for k, v in trial.params.items()})
    _log_best_model(client, run_id, plan, {"number": trial.number,
                                           "mlflow_run_id": trial.user_attrs.get("mlflow_run_id")})


def _log_summary(client, run_id: str, plan: Plan, summary: dict, model: bool = True) -> None:
    metrics = {"n_complete": summary["n_complete"], "n_pruned": summary["n_pruned"],
               "n_failed": summary["n_failed"]}
    best = summary.get("best")
    if best:
        metrics |= {"best_val_acc": best["value"], "best_trial": best["number"]}
        if best.get("test_acc") is not None:
            metrics["test_acc"] = best["test_acc"]
        tracking.log_params(client, run_id, {f"best.{k}": v for k, v in best["params"].items()})
        if model:  # else the re-check's winner's (_log_verdict)
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


def print_summary(plan: Plan, summary: dict, verdict: dict | None = None) -> None:
    print(f"\n[{plan.key}] {summary['n_complete']} complete, {summary['n_pruned']} pruned, "
          f"{summary['n_failed']} failed (of {plan.n_trials} requested)")
    best = summary.get("best")
    if best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        test = best.get("test_acc")
        print(f"[{plan.key}] best trial {best['number']}: {plan.cfg.objective.metric} "
              f"{best['value']:.4f}" + (f", test_acc {test:.4f}" if test is not None else ""))
        print(f"[{plan.key}] best params: {params}")
    if verdict and verdict["winner"] is not None:
        for line in rank.headline(verdict, plan.cfg.objective.metric):
            print(f"[{plan.key}] {line}")
        print(f"[{plan.key}] retrain the winner: python -m pipeline.final "
              f"{study_flags(plan.key, plan.cfg.dataset)}")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
