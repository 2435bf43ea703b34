"""The run's tables, written with the csv module, read back as pandas reads any CSV."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd

from pipeline.training.artifacts import confusion_counts, confusion_csv, history_csv
from pipeline.training.trainer import EpochRecord


def test_history_csv_is_the_text_pandas_writes_with_gaps_and_nan_left_empty():
    history = [EpochRecord(1, 12, {"train_loss": 2.5, "val_acc": math.nan}),
               EpochRecord(2, 24, {"train_loss": 1.25, "val_acc": 0.5, "grad_norm/fc1": 0.1},
                           cycle_end=True)]
    text = history_csv(SimpleNamespace(history=history))
    rows = [{"epoch": r.epoch, "step": r.step, "cycle_end": r.cycle_end, **r.metrics}
            for r in history]
    assert text == pd.DataFrame(rows).to_csv(index=False)
    back = pd.read_csv(io.StringIO(text))
    assert list(back.columns) == ["epoch", "step", "cycle_end", "train_loss", "val_acc",
                                  "grad_norm/fc1"]
    assert back["step"].tolist() == [12, 24] and back["cycle_end"].tolist() == [False, True]
    assert math.isnan(back["val_acc"][0]) and back["val_acc"][1] == 0.5
    assert math.isnan(back["grad_norm/fc1"][0]) and back["grad_norm/fc1"][1] == 0.1


def test_confusion_csv_rows_are_true_classes_and_columns_predicted_ones():
    classes = ["T-shirt/top", "Trouser, long", "Bag"]  # a comma and a slash survive quoting
    cm = confusion_counts(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 3)
    text = confusion_csv(cm, classes)
    assert text == pd.DataFrame(cm, index=classes, columns=classes).to_csv()
    back = pd.read_csv(io.StringIO(text), index_col=0)
    assert back.index.tolist() == classes and back.columns.tolist() == classes
    assert back.to_numpy().tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
