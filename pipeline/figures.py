"""Figures of one training run, as pure functions from plain data to a matplotlib Figure.

Only the object-oriented API is used (no pyplot), so nothing touches a global backend or state;
``save(fig, path)`` renders with Agg. The report stage reuses these for its best-trial views.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

CURVE_PANELS = (("loss", "Loss (cross-entropy)"), ("cost", "Cost (loss + L2)"),
                ("acc", "Accuracy"))


def learning_curves(history: Sequence[dict], title: str = "") -> Figure:
    """Loss, cost and accuracy against update step, train vs validation.

    ``history``: one dict per epoch with ``step`` and the trainer's metric names.
    """
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    steps = [h["step"] for h in history]
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [h.get(f"{split}_{key}", np.nan) for h in history]
            ax.plot(steps, ys, style, markersize=3,
                    label="train" if split == "train" else "validation")
        ax.set(xlabel="update step", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def confusion_matrix_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                            title: str = "Confusion matrix (test)") -> Figure:
    n = len(classes)
    cm = np.bincount(np.asarray(y_true) * n + np.asarray(y_pred), minlength=n * n).reshape(n, n)
    fig = Figure(figsize=(0.55 * n + 3, 0.5 * n + 2.5), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax,
                xticklabels=classes, yticklabels=classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    return fig


def example_grid(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
                 classes: Sequence[str], title: str, n: int = 25) -> Figure:
    """A grid of images (N, C, H, W, any range) labelled 'true -> predicted' (green when right,
    red when wrong).

    The grid is one image on one Axes: a mosaic of the tiles, each under a band for its label.
    A 5 x 5 grid of Axes took 0.6-1.0 s to render; the mosaic, a tenth of that."""
    k = min(n, len(images))
    cols = min(5, max(k, 1))
    rows = max(1, -(-k // cols))
    cell_w_in, cell_h_in = 1.9, 2.0  # inches per cell
    fig = Figure(figsize=(cell_w_in * cols, cell_h_in * rows + 0.4), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    fig.suptitle(title)
    if k == 0:
        ax.text(0.5, 0.5, "none", ha="center", va="center")
        return fig
    tiles = np.asarray(images[:k], dtype=np.float32)
    lo = tiles.min(axis=(1, 2, 3), keepdims=True)
    tiles = (tiles - lo) / np.maximum(tiles.max(axis=(1, 2, 3), keepdims=True) - lo, 1e-6)
    c, h, w = tiles.shape[1:]
    # Each cell: the tile, a label band above it (a third of its height) and a gap beside it,
    # so that a cell's width to height in pixels is its width to height in inches.
    band = max(1, round(h / 3))
    gap = max(1, round(cell_w_in / cell_h_in * (h + band) - w))
    cell_h, cell_w = h + band, w + gap
    # RGBA: the background (bands, gaps, unused cells) is transparent, the figure's white.
    mosaic = np.zeros((rows * cell_h, cols * cell_w, 4), dtype=np.float32)
    if c == 1:  # gray: ink dark on light for the 8x8 digits, as drawn; light on dark otherwise
        gray = 1.0 - tiles[:, 0] if h <= 8 else tiles[:, 0]
        rgb = np.repeat(gray[..., None], 3, axis=-1)
    else:
        rgb = np.transpose(tiles[:, :3], (0, 2, 3, 1))
    for i in range(k):
        r, q = divmod(i, cols)
        y0, x0 = r * cell_h + band, q * cell_w + gap // 2
        mosaic[y0:y0 + h, x0:x0 + w, :3] = rgb[i]
        mosaic[y0:y0 + h, x0:x0 + w, 3] = 1.0
        ok = y_true[i] == y_pred[i]
        ax.text(x0 + w / 2 - 0.5, y0 - 1.0, f"{classes[y_true[i]]} → {classes[y_pred[i]]}",
                ha="center", va="bottom", fontsize=9, color="tab:green" if ok else "tab:red")
    ax.imshow(mosaic, aspect="auto", interpolation="nearest")
    return fig


def lr_schedule(steps: Sequence[int], lrs: Sequence[float], title: str = "") -> Figure:
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, lrs)
    # Linear axis: the triangles of a cyclical schedule stay triangles.
    ax.set(xlabel="update step", ylabel="learning rate", title=title or "Learning-rate schedule")
    ax.grid(alpha=0.3)
    return fig


def grad_norms(history: Sequence[dict], title: str = "") -> Figure:
    """Per-layer gradient magnitude against update step (log scale): vanishing/exploding."""
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    layers = sorted({k.split("/", 1)[1] for h in history for k in h if k.startswith("grad_norm/")},
                    key=_layer_order)
    steps = [h["step"] for h in history]
    for layer in layers:
        ax.plot(steps, [h.get(f"grad_norm/{layer}", np.nan) for h in history], label=layer)
    ax.set(xlabel="update step", ylabel="RMS gradient norm per update", yscale="log",
           title=title or "Per-layer gradient magnitude")
    ax.grid(alpha=0.3)
    if layers:
        ax.legend(fontsize=8, ncol=2)
    return fig


def _layer_order(name: str) -> tuple[int, int]:
    kind = 0 if name.startswith("conv") else 1 if name.startswith("fc") else 2
    digits = "".join(c for c in name if c.isdigit())
    return kind, int(digits) if digits else 0


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
