"""Summaries of a study's trials as pure functions over Optuna's FrozenTrial objects."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from pipeline import names


def summarize(trials: Sequence[FrozenTrial], direction: str) -> dict:
    """Counts by state and the best complete trial (chosen on the validation objective)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    out = {
        "n_trials": len(trials),
        "n_complete": len(complete),
        "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "n_running": sum(t.state == TrialState.RUNNING for t in trials),
        "best": None,
    }
    if complete:
        sign = -1.0 if direction == "maximize" else 1.0
        best = min(complete, key=lambda t: (sign * t.value, t.number))  # ties: the earlier
        out["best"] = {"number": best.number, "value": best.value, "params": dict(best.params),
                       "test_acc": best.user_attrs.get("test_acc"),
                       "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}
    return out


def format_trial_line(trial: FrozenTrial, seconds: float, metric: str) -> str:
    """One line per finished trial: number, params, value, state, seconds."""
    shown = trial.params or {k: trial.user_attrs[k] for k in (names.CANDIDATE, names.SEED_INDEX)
                             if k in trial.user_attrs}  # a re-check trial: what it retrains
    params = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
    if trial.state == TrialState.COMPLETE:
        value = f"{metric}={trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        last = trial.intermediate_values.get(max(trial.intermediate_values, default=0))
        value = f"{metric}={last:.4f}" if last is not None else f"{metric}=n/a"
    else:
        value = f"{metric}=n/a"
    note = trial.user_attrs.get("pruned_reason") or trial.user_attrs.get("error") or ""
    return (f"trial {trial.number:4d} {trial.state.name:8s} {value} {seconds:6.1f}s  {params}"
            + (f"  ({note})" if note else ""))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def budget_spent(trials: Sequence[FrozenTrial], n_trials: int) -> bool:
    """Whether a study has its ``n_trials``: complete, pruned, running and waiting trials count
    (failed ones are replaced), and a waiting (enqueued) trial is always run."""
    counted = [t for t in trials if t.state in (*FINISHED, TrialState.RUNNING,
                                                TrialState.WAITING)]
    waiting = any(t.state == TrialState.WAITING for t in counted)
    return not waiting and len(counted) >= n_trials
