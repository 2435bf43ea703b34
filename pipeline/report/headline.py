"""The report's opening: which model to take, how sure to be of it, and how to retrain it.

With a re-check (pipeline.search.recheck), the winner is the best mean over fresh seeds: its
validation and test accuracy as mean ± standard deviation with the interval, the runner-up and
whether the two can be told apart, and how much the search's single run flattered the winner;
a figure shows every re-check run beside the candidate's original run. Without one, the best
single trial, said to be a single draw. Reads only the MLflow store.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from pipeline import names
from pipeline.report.extract import StudyData, find_study_runs, json_artifact, search_all
from pipeline.report.render import Section
from pipeline.search import rank
from pipeline.search.plan import study_flags


def load_recheck(client, data: StudyData) -> None:
    """The latest re-check verdict of the study (``recheck.json`` on its newest study run that
    has one) and the re-check runs of its candidates."""
    for run in find_study_runs(client, data.key):
        if (verdict := json_artifact(client, run.info.run_id, names.RECHECK)) is not None:
            data.recheck = verdict
            break
    else:
        return
    candidates = {r["candidate"] for r in data.recheck["ranking"]}
    rows = []
    for r in search_all(client, names.where((names.STUDY, data.key),
                                            (names.KIND, names.KIND_RECHECK))):
        number = int(r.data.tags.get(names.TRIAL_NUMBER, -1))
        index = r.data.params.get("recheck_index")
        if number in candidates and index is not None and r.info.status == "FINISHED":
            m = r.data.metrics
            rows.append({"candidate": number, "seed_index": int(index),
                         "value": m.get("objective"), "test_acc": m.get("test_acc"),
                         "train_seconds": m.get("train_seconds"), "epochs": m.get("epoch"),
                         "start_time": r.info.start_time})
    frame = pd.DataFrame(rows, columns=["candidate", "seed_index", "value", "test_acc",
                                        "train_seconds", "epochs", "start_time"])
    data.recheck_runs = (frame.sort_values("start_time")
                         .drop_duplicates(["candidate", "seed_index"], keep="last")
                         .sort_values(["candidate", "seed_index"]).reset_index(drop=True))


def _params(data: StudyData, number: int) -> str:
    row = data.trials.loc[data.trials.number == number]
    if row.empty:
        return ""
    return ", ".join(f"{n}={_fmt(row.iloc[0][n])}" for n in data.param_names if n in row)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def headline_text(data: StudyData) -> str:
    """Two or three sentences that answer "which model, how good, how sure"."""
    flags = study_flags(data.key, data.study_params.get("study.dataset", ""))
    retrain = f"Retrain it: python -m pipeline.final {flags}."
    verdict = data.recheck
    if verdict and verdict.get("winner") is not None:
        win = verdict["winner"]
        lines = rank.headline(verdict, data.metric)
        lines[0] = lines[0].replace(f"winner: trial {win}, ",
                                    f"Winner: trial {win} ({_params(data, win)}): ", 1)
        return (" ".join(f"{line[0].upper()}{line[1:]}." for line in lines)
                + f" The re-check trained {verdict['n_runs']} runs. {retrain}")
    best = data.best
    test = f", test accuracy {best.test_acc:.4f}" if pd.notna(best.test_acc) else ""
    return (f"Best trial {int(best.number)} ({_params(data, int(best.number))}): "
            f"{data.metric} {best.objective:.4f}{test}, from a single run: not re-checked over "
            "fresh seeds, so the number is optimistic (the search kept the highest draws). Add "
            f"recheck: to the study file, or run python -m pipeline.recheck --study "
            f"{data.key}. {retrain}")


def recheck_table(data: StudyData) -> pd.DataFrame:
    """Every candidate: re-check mean, spread and interval beside its original run."""
    table = pd.DataFrame(data.recheck["ranking"]).rename(columns={
        "candidate": "trial", "n": "seeds", "original": "single run"})
    return table[["trial", "seeds", "val_mean", "val_std", "val_ci_low", "val_ci_high",
                  "test_mean", "test_std", "single run", "optimism"]]


def recheck_figure(data: StudyData) -> Figure:
    """Each candidate's re-check runs (points), their mean and interval (bar), and the
    candidate's original single run (cross), best mean first."""
    ranking = data.recheck["ranking"]
    fig = Figure(figsize=(max(5.0, 1.1 * len(ranking) + 2), 4), layout="constrained")
    ax = fig.subplots()
    runs = data.recheck_runs if data.recheck_runs is not None else pd.DataFrame()
    for x, cand in enumerate(ranking):
        values = runs.loc[runs.candidate == cand["candidate"], "value"] if len(runs) else []
        ax.scatter([x - 0.12] * len(values), values, s=22, color="tab:blue", alpha=0.7,
                   label="re-check runs" if x == 0 else None)
        if math.isfinite(cand["val_ci_low"]):
            ax.errorbar([x + 0.05], [cand["val_mean"]], color="black", capsize=4,
                        yerr=[[cand["val_mean"] - cand["val_ci_low"]],
                              [cand["val_ci_high"] - cand["val_mean"]]],
                        fmt="o", label=f"mean, {round(100 * data.recheck['confidence'])} % "
                                       "interval" if x == 0 else None)
        ax.scatter([x + 0.2], [cand["original"]], marker="x", s=50, color="tab:red",
                   label="original single run" if x == 0 else None)
    ax.set_xticks(range(len(ranking)), [f"trial {c['candidate']}" for c in ranking])
    ax.set(ylabel=data.metric, title=f"{data.key}: re-check of the best trials over "
                                     f"{data.recheck['seeds']} fresh seeds")
    ax.legend(fontsize=8)
    return fig


def headline_section(data: StudyData, prefix: str = "") -> Section:
    """The report's first section for one study."""
    from pipeline.figures import to_png

    sec = Section(f"Headline: {data.key}", headline_text(data))
    if data.recheck and data.recheck.get("winner") is not None:
        sec.tables.append((f"{prefix}recheck", recheck_table(data)))
        sec.figures.append((f"{prefix}recheck.png", "Each candidate's re-check runs (blue), "
                            "their mean and interval (black), and the single run the search "
                            "selected it on (red cross): a cross above the points is the "
                            "search's optimism.", to_png(recheck_figure(data))))
    return sec
