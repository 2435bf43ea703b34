"""Report view of a transfer study (studies/transfer.yaml): which way to start wins.

Every setup (``transfer`` mode x learning rate) with its validation and test accuracy; the best
and the worst setup by validation accuracy (the test column is shown, never used to choose); and
test images the best setup classifies correctly and the worst does not. Runs of one dataset share
the test split, so the worst run's misclassified examples (``examples.npz``: images, true and
predicted labels, and their test-split positions) are checked against the best run's prediction
for the same position (``test_predictions.npy``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import names
from pipeline.report.extract import StudyData, ViewInfo

ARTIFACTS = (names.EXAMPLES, names.PREDICTIONS)  # needed from every complete trial
MODES = ("scratch", "linear_probe", "fine_tune")


def _setup(row: pd.Series, names: list[str]) -> str:
    return ", ".join(f"{n}={row[n]:g}" if isinstance(row[n], float) else f"{n}={row[n]}"
                     for n in names)


def transfer_info(data: StudyData) -> ViewInfo:
    """The setups table, the best and worst setups, and the images that separate them."""
    names = sorted((n for n in data.param_names if n in data.trials), key=lambda n: n != "transfer")
    ranked = data.ranked()
    table = ranked[["number", *names, "objective", "test_acc"]].rename(
        columns={"objective": data.metric}).reset_index(drop=True)
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    text = (f"Best setup: {_setup(best, names)} (trial {int(best.number)}, validation "
            f"{best.objective:.4f}, test {best.test_acc:.4f}); worst: {_setup(worst, names)} "
            f"(trial {int(worst.number)}, validation {worst.objective:.4f}, test "
            f"{worst.test_acc:.4f}). Setups are ranked on validation accuracy; test accuracy is "
            "shown, not used to choose.")
    if "transfer" in names:
        by_mode = ranked.groupby("transfer").objective.max()
        text += " Best validation accuracy per start: " + ", ".join(
            f"{m} {by_mode[m]:.4f}" for m in MODES if m in by_mode) + "."
    examples = contrast_examples(data.trial_artifacts.get(int(best.number), {}),
                                 data.trial_artifacts.get(int(worst.number), {}))
    plots = {"examples": examples, "best": _setup(best, names), "worst": _setup(worst, names),
             "table": table, "names": names, "metric": data.metric}
    tables = {"setups": table, "best_right_worst_wrong": pd.DataFrame(
        {"test_index": examples["index"], "true": examples["true"],
         "best_pred": examples["best_pred"], "worst_pred": examples["worst_pred"]})}
    return ViewInfo(text, tables, plots)


def contrast_examples(best: dict, worst: dict) -> dict:
    """Test images the worst run misclassified (among those it logged) and the best run got
    right, with labels; empty when either run's files are missing."""
    empty = {"index": np.zeros(0, int), "true": np.zeros(0, int), "best_pred": np.zeros(0, int),
             "worst_pred": np.zeros(0, int), "images": np.zeros((0, 1, 1, 1)), "classes": []}
    ex, pred = worst.get(names.EXAMPLES), best.get(names.PREDICTIONS)
    if ex is None or pred is None or "wrong_index" not in ex:
        return empty
    index = np.asarray(ex["wrong_index"], dtype=int)
    keep = pred[index] == ex["wrong_true"]
    return {"index": index[keep], "true": np.asarray(ex["wrong_true"])[keep],
            "best_pred": np.asarray(pred)[index][keep],
            "worst_pred": np.asarray(ex["wrong_pred"])[keep],
            "images": np.asarray(ex["wrong_images"])[keep], "classes": list(ex["classes"])}


def transfer_render(info: ViewInfo) -> list:
    """Validation accuracy against learning rate per start; the contrasting examples."""
    from matplotlib.figure import Figure

    from pipeline.figures import example_grid

    out = []
    table, names = info.plots["table"], info.plots["names"]
    rate = names[1] if len(names) > 1 else None
    if "transfer" in names and rate and pd.api.types.is_numeric_dtype(table[rate]):
        fig = Figure(figsize=(6.5, 4), layout="constrained")
        ax = fig.subplots()
        for mode, rows in table.groupby("transfer"):
            rows = rows.sort_values(rate)
            ax.plot(rows[rate], rows[info.plots["metric"]], "-o", label=str(mode))
        ax.set(xscale="log", xlabel=rate, ylabel=info.plots["metric"],
               title="Validation accuracy by start and learning rate")
        ax.grid(alpha=0.3)
        ax.legend()
        out.append(("by_lr", "Validation accuracy of each start (scratch, linear probe, "
                    "fine-tune) against the learning rate.", fig))
    ex = info.plots["examples"]
    fig = example_grid(ex["images"], ex["true"], ex["worst_pred"], ex["classes"] or
                       [str(i) for i in range(10)],
                       f"right by the best: {info.plots['best']}\nwrong by the worst: "
                       f"{info.plots['worst']}\n(true → the worst's prediction)")
    out.append(("examples", "Test images the best setup classifies correctly and the worst "
                "does not, labelled true → the worst setup's prediction (the best predicts the "
                "true class).", fig))
    return out
