"""The files a training run leaves behind, as ``{relative path: bytes}`` (no MLflow here)."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import torch

from pipeline import names
from pipeline.training.data import Splits
from pipeline.training.trainer import TrainResult

N_EXAMPLES = 25


# The two tables are written with the csv module: a trial writes them while the next one waits,
# and building a DataFrame to print a few dozen rows cost 1 to 3 ms of a 100 ms digits trial.
# Same text as pandas' to_csv (NaN as an empty field), read back with pandas.read_csv.


def history_csv(result: TrainResult) -> str:
    """One row per epoch: epoch, step, cycle_end and every metric (empty where absent)."""
    rows = [{"epoch": r.epoch, "step": r.step, "cycle_end": r.cycle_end, **r.metrics}
            for r in result.history]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return _csv([columns] + [[_field(row.get(c)) for c in columns] for row in rows])


def confusion_csv(cm: np.ndarray, classes) -> str:
    """Rows: true class; columns: predicted class; both labelled with the class names."""
    return _csv([["", *classes]] + [[name, *map(int, counts)]
                                    for name, counts in zip(classes, cm)])


def _field(value):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    flat = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def examples_npz(splits: Splits, test_pred: np.ndarray, n: int = N_EXAMPLES) -> bytes:
    """What a report needs from the dataset, so that it never loads one: class counts of each
    split, and the first misclassified and correctly classified test images with labels and
    their positions in the test split (``*_index``: runs of one dataset share the test split,
    so a view can compare runs' predictions on the same images)."""
    y = splits.y_test.numpy()
    pred = np.asarray(test_pred)
    wrong, right = np.flatnonzero(pred != y), np.flatnonzero(pred == y)
    k = splits.n_classes
    buf = io.BytesIO()
    np.savez(buf, classes=np.array(splits.classes, dtype=str),
             train_counts=np.bincount(splits.y_train.numpy(), minlength=k),
             val_counts=np.bincount(splits.y_val.numpy(), minlength=k),
             test_counts=np.bincount(y, minlength=k), n_wrong=np.array(len(wrong)),
             wrong_images=splits.x_test[wrong[:n]].numpy(), wrong_true=y[wrong[:n]],
             wrong_pred=pred[wrong[:n]], wrong_index=wrong[:n],
             right_images=splits.x_test[right[:n]].numpy(), right_true=y[right[:n]],
             right_index=right[:n])
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def weights_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def training_artifacts(result: TrainResult, splits: Splits, with_figures: bool = True,
                       with_weights: bool = True) -> dict[str, bytes | str]:
    """Learning curves, confusion matrix, misclassified and correctly classified examples,
    gradient norms, history, class counts and example images, the resolved configuration and
    the weights of the model tested (best-validation epoch, or last without validation)."""
    y_true, y_pred = splits.y_test.numpy(), result.test_pred.numpy()
    cm = confusion_counts(y_true, y_pred, splits.n_classes)
    files: dict[str, bytes | str] = {
        names.HISTORY: history_csv(result),
        names.CONFIG: json.dumps(result.config.model_dump(), indent=2),
        names.CONFUSION: confusion_csv(cm, splits.classes),
        names.EXAMPLES: examples_npz(splits, y_pred),
        names.PREDICTIONS: npy(y_pred.astype(np.int16)),  # every test prediction, to compare runs
    }
    if with_weights:
        files[names.WEIGHTS] = weights_bytes(result.model)
    if with_figures:
        from pipeline import figures  # matplotlib and seaborn cost seconds to import

        history = [{"step": r.step, **r.metrics} for r in result.history]
        title = (f"{splits.name}: best val acc {result.best_val_acc:.4f}, "
                 if len(splits.y_val) else f"{splits.name} (trained on train+val): ") + \
            f"test acc {result.test_acc:.4f}"
        wrong = np.flatnonzero(y_true != y_pred)[:25]
        images = splits.x_test[wrong].numpy()
        files["learning_curves.png"] = figures.to_png(figures.learning_curves(history, title))
        files["confusion_matrix.png"] = figures.to_png(
            figures.confusion_matrix_figure(y_true, y_pred, splits.classes))
        files["misclassified.png"] = figures.to_png(figures.example_grid(
            images, y_true[wrong], y_pred[wrong], splits.classes,
            f"Misclassified test examples ({int((y_true != y_pred).sum())} of {len(y_true)})"))
        right = np.flatnonzero(y_true == y_pred)[:25]
        files["correct.png"] = figures.to_png(figures.example_grid(
            splits.x_test[right].numpy(), y_true[right], y_pred[right], splits.classes,
            f"Correctly classified test examples ({len(np.flatnonzero(y_true == y_pred))} of "
            f"{len(y_true)})"))
        files["grad_norms.png"] = figures.to_png(figures.grad_norms(history))
    return files
