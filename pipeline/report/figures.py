"""Report figures: each a function from extracted StudyData to a matplotlib Figure, with a caption.

Uses the object-oriented matplotlib API only (no pyplot global state). Log axes wherever the
parameter was searched in log space.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from pipeline import figures
from pipeline.report.extract import StudyData, best_so_far, boundary_flags

STATE_COLORS = {"complete": "tab:blue", "pruned": "tab:orange", "failed": "tab:red",
                "running": "tab:gray"}


def _is_log(data: StudyData, name: str) -> bool:
    return bool(data.space.get(name, {}).get("log"))


def _numeric(data: StudyData, name: str) -> bool:
    return data.space.get(name, {}).get("type") in ("float", "int")


def history(data: StudyData) -> Figure:
    t = best_so_far(data)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for state, group in t.groupby("state"):
        y = group.objective.where(group.state == "complete", group.last_value)
        ax.scatter(group.number, y, s=18, label=state, color=STATE_COLORS.get(state, "k"),
                   alpha=0.8)
    ax.step(t.number, t.best_so_far, where="post", color="black", label="best so far")
    ax.set(xlabel="trial number", ylabel=data.metric, title=f"{data.key}: optimisation history")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def objective_vs_params(data: StudyData) -> Figure:
    names = data.param_names or ["number"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.3 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    c = data.complete
    flags = boundary_flags(data)
    for ax, name in zip(axes, names):
        spec = data.space.get(name, {})
        if _numeric(data, name):
            ax.scatter(c[name], c.objective, s=16, alpha=0.8)
            if _is_log(data, name):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # keep decade labels readable
            for edge in ("low", "high"):  # the range searched; the flagged edge in red
                flagged = flags.get(name, "").startswith(edge)
                ax.axvline(spec[edge], color="tab:red" if flagged else "0.6",
                           ls="--", lw=2 if flagged else 1)
        else:
            sns.stripplot(x=c[name].astype(str), y=c.objective, ax=ax, size=4)
        ax.set(xlabel=name + (" (log)" if _is_log(data, name) else ""), ylabel=data.metric)
        ax.set_title(f"{name}" + (f"  ⚠ near {flags[name]} edge" if name in flags else ""),
                     fontsize=10, color="tab:red" if name in flags else "black")
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.axis("off")
    return fig


def pair(data: StudyData, x: str = "l2_lambda", y: str = "eta_max") -> Figure:
    fig = Figure(figsize=(6, 4.8), layout="constrained")
    ax = fig.subplots()
    c = data.complete
    if x in c and y in c:
        points = ax.scatter(c[x], c[y], c=c.objective, cmap="viridis", s=30, edgecolor="k",
                            linewidth=0.3)
        fig.colorbar(points, ax=ax, label=data.metric)
        b = data.best
        ax.scatter([b[x]], [b[y]], marker="*", s=250, color="tab:red", label="best")
        ax.legend()
        ax.set_xscale("log" if _is_log(data, x) else "linear")
        ax.set_yscale("log" if _is_log(data, y) else "linear")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.text(0.5, 0.5, f"{x} and {y} were not both searched", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel=x, ylabel=y, title=f"{y} against {x}, coloured by {data.metric}")
    ax.grid(alpha=0.3)
    return fig


def parallel_coordinates(data: StudyData) -> Figure:
    c = data.complete
    names = [n for n in data.param_names if n in c]
    fig = Figure(figsize=(max(6, 1.6 * (len(names) + 1)), 4.2), layout="constrained")
    ax = fig.subplots()
    cols = {}
    for n in names:
        if _numeric(data, n):
            v = c[n].astype(float)
            v = np.log10(v) if _is_log(data, n) else v
        else:
            v = c[n].astype(str).astype("category").cat.codes.astype(float)
        span = (v.max() - v.min()) or 1.0
        cols[n + (" (log)" if _is_log(data, n) else "")] = (v - v.min()) / span
    cols[data.metric] = (c.objective - c.objective.min()) / ((c.objective.max()
                                                               - c.objective.min()) or 1.0)
    frame = pd.DataFrame(cols)
    norm = frame[data.metric]
    cmap = sns.color_palette("viridis", as_cmap=True)
    order = norm.sort_values().index  # best drawn last, on top
    for i in order:
        ax.plot(range(len(frame.columns)), frame.loc[i], color=cmap(norm[i]), alpha=0.7, lw=1.2)
    ax.set_xticks(range(len(frame.columns)), frame.columns, rotation=20)
    ax.set(ylabel="scaled value (min–max per axis)", title="Parallel coordinates (colour: "
           f"{data.metric})")
    ax.grid(alpha=0.3, axis="x")
    return fig


def importance(importances: dict[str, float], title: str,
               empty: str = "not enough complete trials") -> Figure:
    fig = Figure(figsize=(6, 0.45 * max(len(importances), 2) + 1.2), layout="constrained")
    ax = fig.subplots()
    if importances:
        items = sorted(importances.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    else:
        ax.text(0.5, 0.5, textwrap.fill(empty, 60), ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="importance (fANOVA, normalised)", title=title)
    ax.grid(alpha=0.3, axis="x")
    return fig


def top_curves(data: StudyData) -> Figure:
    fig = Figure(figsize=(14, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    palette = sns.color_palette("tab10")
    for i, (number, hist) in enumerate(data.histories.items()):
        for ax, key in zip(axes, ("loss", "cost", "acc")):
            for split, ls in (("train", "--"), ("val", "-")):
                col = f"{split}_{key}"
                if col in hist:
                    ax.plot(hist.step, hist[col], ls, color=palette[i % 10],
                            label=f"#{number} {split}")
    for ax, (_, label) in zip(axes, figures.CURVE_PANELS):
        ax.set(xlabel="update step", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Learning curves of the top {len(data.histories)} trials "
                 "(dashed: train, solid: validation)")
    return fig


def lr_schedule(data: StudyData) -> Figure:
    """The best trial's schedule at every update, recomputed from its settings (no training)."""
    from pipeline.config import TrainConfig
    from pipeline.training.schedule import lr_schedule_values

    cfg = data.best_artifacts.get("config")
    hist = data.histories.get(int(data.best.number))
    if cfg is None or hist is None or hist.empty:
        return _missing("the best trial's settings or step metrics are not logged")
    steps_per_epoch = int(hist.step.iloc[0])  # the first epoch's row is logged at its last step
    steps, lrs = lr_schedule_values(TrainConfig(**cfg), steps_per_epoch)
    return figures.lr_schedule(steps, lrs, f"Learning rate of the best trial #{data.best.number}")


def generalisation(data: StudyData) -> Figure:
    c = data.complete.dropna(subset=["test_acc"])
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(c.best_val_acc, c.test_acc, s=18, alpha=0.8)
    lo = float(min(c.best_val_acc.min(), c.test_acc.min())) if len(c) else 0.0
    ax.plot([lo, 1], [lo, 1], color="0.5", ls="--", label="test = validation")
    b = data.best
    ax.scatter([b.best_val_acc], [b.test_acc], marker="*", s=220, color="tab:red",
               label="selected (best validation)")
    ax.set(xlabel="best validation accuracy", ylabel="test accuracy",
           title="Validation vs test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def confusion(data: StudyData) -> Figure:
    cm = data.best_artifacts.get("confusion")
    if cm is None:
        return _missing("confusion matrix not logged")
    n = len(cm)
    fig = Figure(figsize=(0.55 * n + 3, 0.5 * n + 2.5), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Confusion matrix of the best trial #{data.best.number} (test)")
    return fig


def misclassified(data: StudyData) -> Figure:
    ex = data.best_artifacts.get("examples")
    if ex is None:
        return _missing("the best trial logged no example images")
    return figures.example_grid(
        ex["wrong_images"], ex["wrong_true"], ex["wrong_pred"], list(ex["classes"]),
        f"Misclassified test examples of the best trial ({int(ex['n_wrong'])} of "
        f"{int(ex['test_counts'].sum())})")


def correct(data: StudyData) -> Figure:
    ex = data.best_artifacts.get("examples")
    if ex is None or "right_images" not in ex:
        return _missing("the best trial logged no example images")
    n_right = int(ex["test_counts"].sum()) - int(ex["n_wrong"])
    return figures.example_grid(
        ex["right_images"], ex["right_true"], ex["right_true"], list(ex["classes"]),
        f"Correctly classified test examples of the best trial ({n_right} of "
        f"{int(ex['test_counts'].sum())})")


def grad_norms(data: StudyData) -> Figure:
    hist = data.histories.get(int(data.best.number))
    if hist is None:
        return _missing("no step metrics for the best trial")
    return figures.grad_norms(hist.to_dict("records"),
                              f"Per-layer gradient magnitude, best trial #{data.best.number}")


def compare_objectives(datas: list[StudyData]) -> Figure:
    fig = Figure(figsize=(max(5, 2.2 * len(datas)), 4.2), layout="constrained")
    ax = fig.subplots()
    frame = pd.concat([d.complete.assign(study=d.key) for d in datas])
    sns.boxplot(data=frame, x="study", y="objective", ax=ax, color="0.85")
    sns.stripplot(data=frame, x="study", y="objective", ax=ax, size=4)
    ax.set(ylabel=datas[0].metric, title="Objective of complete trials by study")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _missing(text: str) -> Figure:
    fig = Figure(figsize=(5, 2), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


CAPTIONS = {
    "history": "Each dot is a trial; the black line is the best so far. A line still climbing at "
               "the end says more trials would pay.",
    "objective_vs_params": "Objective against each hyperparameter; dashed lines are the range "
                           "searched. Best points piled against a red (flagged) edge mean the "
                           "optimum may lie outside the range.",
    "pair": "λ against eta_max coloured by the objective: look for the band where both are "
            "right together; the star is the selected trial.",
    "parallel_coordinates": "Each line is a complete trial, brighter is better: parameters where "
                            "the bright lines bunch together are the ones that matter.",
    "importance": "Share of the objective's variance each hyperparameter explains (fANOVA): "
                  "narrow the important ones, fix the unimportant ones.",
    "top_curves": "Training (dashed) vs validation (solid) loss, cost and accuracy of the best "
                  "trials: a widening gap is overfitting, a flat start a too-small learning rate.",
    "lr_schedule": "The learning rate of the selected trial at every update: check the cycles "
                   "and bounds are what you meant.",
    "generalisation": "Validation vs test accuracy per trial: points far below the diagonal are "
                      "overfitted to the validation split.",
    "confusion": "Test confusion matrix of the selected model: off-diagonal cells show which "
                 "classes it mixes up.",
    "misclassified": "Test examples the selected model gets wrong (true → predicted): are the "
                     "errors ambiguous images or systematic mistakes?",
    "correct": "Test examples the selected model gets right (true → predicted), for "
               "comparison with the mistakes above.",
    "grad_norms": "Per-layer gradient magnitude over training for the selected trial: layers "
                  "orders of magnitude apart signal vanishing or exploding gradients.",
    "compare": "Distribution of the objective in each study: a fine study should sit higher "
               "and tighter than its parent.",
}
