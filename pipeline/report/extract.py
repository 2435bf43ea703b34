"""Extract what a study logged from the MLflow tracking store into plain tables (no plotting).

Works from MLflow alone (any tracking URI, a remote server included): runs are found by their
``pipeline.study`` / ``pipeline.kind`` tags; the search space and narrowing come from the study
run's artifacts. Step metrics are fetched only for the few trials whose curves are drawn, so a
study of hundreds of trials is read with a handful of bulk queries.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import config, names

CURVE_METRICS = ("train_loss", "train_cost", "train_acc", "val_loss", "val_cost", "val_acc", "lr")
STATES = {"FINISHED": "complete", "KILLED": "pruned", "FAILED": "failed", "RUNNING": "running",
          "SCHEDULED": "running"}


class ReportError(RuntimeError):
    """The study cannot be reported (missing, empty, all failed); the message says why."""


@dataclass
class StudyData:
    """Everything the report shows about one study, as plain data."""

    key: str
    study_run_id: str
    study_params: dict
    study_tags: dict
    trials: pd.DataFrame  # one row per trial number (latest run wins)
    param_names: list[str]
    space: dict  # name -> plain spec (search_space.json)
    narrowing: dict | None
    metric: str
    direction: str
    histories: dict[int, pd.DataFrame] = field(default_factory=dict)  # trial number -> epochs
    best_artifacts: dict = field(default_factory=dict)  # confusion matrix, predictions, config
    views: list[str] = field(default_factory=list)  # report views the study file asks for
    trial_histories: dict[int, pd.DataFrame] = field(default_factory=dict)
    trial_artifacts: dict[int, dict] = field(default_factory=dict)
    """Files of every complete trial that its views need: number -> {file name: content}."""
    recheck: dict | None = None  # the re-check's verdict (recheck.json), if the study has one
    recheck_runs: pd.DataFrame | None = None  # its runs: candidate, seed_index, value, test_acc
    importance: object | None = None  # the report's build.Importance, once computed

    @property
    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials.state == "complete"]

    @property
    def best(self) -> pd.Series:
        c = self.complete
        ascending = self.direction == "minimize"
        return c.sort_values(["objective", "number"], ascending=[ascending, True]).iloc[0]

    def ranked(self) -> pd.DataFrame:
        ascending = self.direction == "minimize"
        return self.complete.sort_values(["objective", "number"], ascending=[ascending, True])


@dataclass
class ViewInfo:
    """What a report view computed from a StudyData (plain data, no plotting)."""

    text: str = ""  # the answer to the study's question, in a sentence or two
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # printed and written as CSV
    plots: dict = field(default_factory=dict)  # plain data the view's figures draw


def _experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def search_all(client: MlflowClient, filter_string: str) -> list:
    runs, token = [], None
    exps = _experiments(client)
    while True:
        page = client.search_runs(exps, filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_study_runs(client: MlflowClient, key: str) -> list:
    """The study's execution runs, newest first."""
    runs = search_all(client, names.where((names.STUDY, key), (names.KIND, names.KIND_STUDY)))
    return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def json_artifact(client: MlflowClient, run_id: str, path: str):
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
    except Exception:  # absent artifact: an older run or a study without narrowing
        return None


def planned_epochs(params: dict) -> float:
    """Epochs a trial would run without pruning (from its logged training settings)."""
    try:
        return float(config.planned_epochs(params.get("schedule", "cyclical"),
                                    *(float(params.get(k, "nan")) for k in
                                      ("epochs", "step_size_epochs", "cycles"))))
    except ValueError:
        return math.nan


def _coerce(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(value, value)


def trials_frame(runs: list, param_names: list[str], metric: str) -> pd.DataFrame:
    """One row per trial (the latest run of each trial number), from bulk-searched runs."""
    rows = []
    for r in runs:
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        if names.TRIAL_NUMBER not in t:
            continue
        state = STATES.get(r.info.status, r.info.status.lower())
        objective = m.get("objective")
        if objective is None and state == "complete":
            objective = m.get(f"best_{metric}", m.get(metric))
        row = {
            "number": int(t[names.TRIAL_NUMBER]), "run_id": r.info.run_id, "state": state,
            "objective": objective, "last_value": m.get(metric),
            "test_acc": m.get("test_acc"), "best_val_acc": m.get("best_val_acc"),
            "train_cost": m.get("train_cost"), "n_params": m.get("n_params"),
            "train_seconds": m.get("train_seconds"),
            "wall_seconds": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
            if r.info.start_time else math.nan,
            "epochs_run": m.get("epoch", 0.0), "epochs_planned": planned_epochs(p),
            "start_time": r.info.start_time, "pruned_reason": t.get(names.PRUNED, ""),
        }
        row |= {name: _coerce(p[name]) for name in param_names if name in p}
        rows.append(row)
    columns = ["number", "run_id", "state", "objective", "last_value", "test_acc", "best_val_acc",
               "train_cost", "n_params", "train_seconds", "wall_seconds", "epochs_run",
               "epochs_planned", "start_time", "pruned_reason", *param_names]
    df = pd.DataFrame(rows, columns=columns)
    df = df.sort_values("start_time").drop_duplicates("number", keep="last")
    return df.sort_values("number").reset_index(drop=True)


def metric_history(client: MlflowClient, run_id: str, keys: list[str]) -> pd.DataFrame:
    """Step metrics of one run as a frame indexed by step (one row per epoch)."""
    cols = {}
    for key in keys:
        hist = client.get_metric_history(run_id, key)
        cols[key] = pd.Series({h.step: h.value for h in hist}, dtype=float)
    return pd.DataFrame(cols).sort_index().rename_axis("step").reset_index()


def extract_study(client: MlflowClient, key: str, top_n: int = 5) -> StudyData:
    """Read one study from the tracking store; raises ReportError when there is nothing to show."""
    study_runs = find_study_runs(client, key)
    if not study_runs:
        known = sorted({r.data.tags.get(names.STUDY) for r in
                        search_all(client, names.where((names.KIND, names.KIND_STUDY)))} - {None})
        raise ReportError(f"no study {key!r} in the tracking store {client.tracking_uri}. "
                          f"Studies found: {', '.join(known) or 'none'}. Run it first: "
                          f"python -m pipeline.search --study {key}")
    latest = study_runs[0]
    space = next((s for r in study_runs if (s := json_artifact(client, r.info.run_id,
                                                                 names.SEARCH_SPACE))), {})
    narrowing = next((n for r in study_runs if (n := json_artifact(client, r.info.run_id,
                                                                     names.NARROWING))), None)
    params = latest.data.params
    metric = params.get("study.metric", "val_acc")
    direction = params.get("study.direction", "maximize")
    runs = search_all(client, names.where((names.STUDY, key), (names.KIND, names.KIND_TRIAL)))
    trials = trials_frame(runs, list(space), metric)
    if trials.empty:
        raise ReportError(f"study {key!r} has no trials yet: run python -m pipeline.search "
                          f"--study {key}")
    data = StudyData(key, latest.info.run_id, dict(params), dict(latest.data.tags), trials,
                     list(space), space, narrowing, metric, direction)
    if data.complete.empty:
        counts = trials.state.value_counts().to_dict()
        raise ReportError(f"study {key!r} has no completed trial ({counts}); nothing to compare. "
                          "Check the failed trials' error.txt in mlflow ui.")
    keys = list(CURVE_METRICS)
    for number in data.ranked().number.head(top_n):
        run_id = trials.loc[trials.number == number, "run_id"].iloc[0]
        if number == data.best.number:
            grads = [k for k in client.get_run(run_id).data.metrics if k.startswith("grad_norm/")]
            data.histories[number] = metric_history(client, run_id, keys + grads)
        else:
            data.histories[number] = metric_history(client, run_id, keys)
    data.best_artifacts = _best_artifacts(client, data.best.run_id)
    return data


def _best_artifacts(client: MlflowClient, run_id: str) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (names.CONFIG, names.CONFUSION, names.PREDICTIONS,
                     names.EXAMPLES):
            try:
                path = Path(client.download_artifacts(run_id, name, tmp))
            except Exception:
                continue
            if name.endswith(".json"):
                out["config"] = json.loads(path.read_text())
            elif name.endswith(".csv"):
                out["confusion"] = pd.read_csv(path, index_col=0)
            elif name.endswith(".npz"):
                with np.load(path, allow_pickle=False) as npz:
                    out["examples"] = {k: npz[k] for k in npz.files}
            else:
                out["predictions"] = np.load(path, allow_pickle=False)
    return out


# -- pure summaries (tested directly) ---------------------------------------------------------


def summary_table(data: StudyData) -> dict:
    """The headline numbers of a study."""
    t = data.trials
    best = data.best
    pruned = t[t.state == "pruned"]
    saved = float((pruned.epochs_planned - pruned.epochs_run).clip(lower=0).sum())
    return {
        "study": data.key,
        "dataset": data.study_params.get("study.dataset", ""),
        "sampler": data.study_params.get("study.sampler", ""),
        "pruner": data.study_params.get("study.pruner", ""),
        "parent": data.study_params.get("study.parent", "") or "",
        "trials": len(t),
        "complete": int((t.state == "complete").sum()),
        "pruned": int((t.state == "pruned").sum()),
        "failed": int((t.state == "failed").sum()),
        "running": int((t.state == "running").sum()),
        "best_trial": int(best.number),
        f"best_{data.metric}": float(best.objective),
        "test_acc_of_best": float(best.test_acc) if pd.notna(best.test_acc) else math.nan,
        "total_seconds": float(t.wall_seconds.sum()),
        **_recheck_compute(data, float(t.wall_seconds.sum()), float(t.epochs_run.sum())),
        "median_trial_seconds": float(t.wall_seconds.median()),
        "epochs_run": float(t.epochs_run.sum()),
        "epochs_saved_by_pruning": saved,
    }


def _recheck_compute(data: StudyData, seconds: float, epochs: float) -> dict:
    """What the re-check cost, and the study's compute with it (trials + re-check)."""
    runs = data.recheck_runs
    if runs is None or runs.empty:
        return {}
    extra_s, extra_e = float(runs.train_seconds.sum()), float(runs.epochs.sum())
    return {"recheck_runs": len(runs), "recheck_seconds": extra_s, "recheck_epochs": extra_e,
            "compute_seconds_with_recheck": seconds + extra_s,
            "epochs_with_recheck": epochs + extra_e}


def objective_stats(data: StudyData) -> dict:
    """Best / median / quartiles of the objective over complete trials, and trials to the best."""
    values = data.complete.sort_values("number").objective.astype(float)
    best_value = data.best.objective
    reached = data.complete.sort_values("number")
    first = reached[np.isclose(reached.objective.astype(float), best_value)].number.iloc[0]
    return {"best": float(best_value), "q75": float(values.quantile(0.75)),
            "median": float(values.median()), "q25": float(values.quantile(0.25)),
            "trials_to_best": int((data.trials.number <= first).sum())}


def best_so_far(data: StudyData) -> pd.DataFrame:
    """Objective of each trial in order, and the running best over complete trials."""
    t = data.trials.sort_values("number")[["number", "state", "objective", "last_value"]].copy()
    obj = t.objective.where(t.state == "complete")
    best = obj.cummax() if data.direction == "maximize" else obj.cummin()
    t["best_so_far"] = best.ffill()  # pruned and failed trials keep the best so far
    return t


def top_trials(data: StudyData, n: int = 10) -> pd.DataFrame:
    cols = ["number", *data.param_names, "objective", "test_acc", "train_cost", "n_params",
            "train_seconds"]
    top = data.ranked().head(n)[cols].reset_index(drop=True)
    top["n_params"] = top.n_params.astype("Int64")  # a count, printed as one
    return top


def range_changes(data: StudyData) -> pd.DataFrame:
    """Search ranges before and after narrowing, with boundary flags and the edges widened past
    the parent's or stopped by a limit (fine studies only)."""
    from pipeline.search.narrow import describe_edges

    if not data.narrowing:
        return pd.DataFrame()
    rows = []
    for name, rec in data.narrowing.get("params", {}).items():
        old, new = rec["old"], rec["new"]
        rows.append({"param": name, "type": old["type"],
                     "parent_range": _fmt_range(old), "narrowed_range": _fmt_range(new),
                     "boundary_flag": rec.get("boundary") or "",
                     "edges": describe_edges(rec.get("edges") or {})})
    return pd.DataFrame(rows)


def _fmt_range(spec: dict) -> str:
    if spec["type"] == "categorical":
        return "{" + ", ".join(map(str, spec["choices"])) + "}"
    scale = " (log)" if spec.get("log") else ""
    return f"[{spec['low']:.4g}, {spec['high']:.4g}]{scale}"


def boundary_flags(data: StudyData) -> dict[str, str]:
    """Parameters whose best values crowd an edge of the range this study searched."""
    from pipeline.search.narrow import boundary_flag

    top = data.ranked().head(max(2, min(5, len(data.complete))))
    flags = {}
    for name, spec in data.space.items():
        if name in top:
            flag = boundary_flag(spec, list(top[name]), 0.1)
            if flag:
                flags[name] = flag
    if data.narrowing:
        for name, edge in data.narrowing.get("boundary_flags", {}).items():
            flags.setdefault(name, f"{edge} (parent)")
    return flags


def compare_studies(datas: list[StudyData]) -> pd.DataFrame:
    """Side by side: one row per study."""
    rows = []
    for d in datas:
        s, o = summary_table(d), objective_stats(d)
        rows.append({"study": d.key, "sampler": s["sampler"], "trials": s["trials"],
                     "complete": s["complete"], "pruned": s["pruned"], "failed": s["failed"],
                     "best": o["best"], "q75": o["q75"], "median": o["median"], "q25": o["q25"],
                     "trials_to_best": o["trials_to_best"], "test_acc_of_best":
                     s["test_acc_of_best"], "boundary_flags": ", ".join(
                         f"{k}:{v}" for k, v in boundary_flags(d).items())})
    return pd.DataFrame(rows)
