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


def test_example_grid_shows_each_image_in_its_cell_under_its_label():
    """One image on one Axes: tile i is image i rescaled to [0, 1] (ink dark on light for
    8x8 digits), at row i // 5, column i % 5, under 'true → predicted' in green or red."""
    from matplotlib.colors import to_rgba

    from pipeline.figures import example_grid

    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, (7, 1, 8, 8)).astype(np.float32)
    y_true, y_pred = np.array([0, 1, 2, 3, 4, 5, 6]), np.array([0, 1, 9, 3, 4, 5, 0])
    fig = example_grid(images, y_true, y_pred, [str(c) for c in range(10)], "Examples")
    (ax,) = fig.axes
    (shown,) = ax.get_images()
    mosaic = np.asarray(shown.get_array())
    labels = [t for t in ax.texts]
    assert [t.get_text() for t in labels] == [f"{t} → {p}" for t, p in zip(y_true, y_pred)]
    assert [t.get_color() for t in labels] == ["tab:green", "tab:green", "tab:red",
                                               "tab:green", "tab:green", "tab:green", "tab:red"]
    rows, cols = 2, 5
    cell_h, cell_w = mosaic.shape[0] // rows, mosaic.shape[1] // cols
    assert mosaic.shape[0] == rows * cell_h and mosaic.shape[1] == cols * cell_w
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        cell = mosaic[r * cell_h:(r + 1) * cell_h, q * cell_w:(q + 1) * cell_w]
        opaque = cell[..., 3] == 1.0
        assert opaque.sum() == 64  # exactly the tile, the band and gap transparent
        tile = cell[..., 0][opaque].reshape(8, 8)
        expected = 1.0 - (img[0] - img.min()) / (img.max() - img.min())
        np.testing.assert_allclose(tile, expected, atol=1e-6)
        # the label sits above its tile, centred on it
        x, y = labels[i].get_position()
        ys, xs = np.nonzero(opaque)
        assert y <= r * cell_h + ys.min() and abs(x - (q * cell_w + xs.mean())) < 1.0
    assert not mosaic[cell_h:, 2 * cell_w:, 3].any()  # cells 8 to 10 of the grid stay empty
    assert to_rgba(fig.get_facecolor()) == to_rgba("white")
    png = example_grid(images[:0], y_true[:0], y_pred[:0], ["0"], "None")
    assert [t.get_text() for t in png.axes[0].texts] == ["none"]
