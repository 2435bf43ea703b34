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
    """A grid of images (N, C, H, W, any range) labelled 'true -> predicted'."""
    k = min(n, len(images))
    cols = min(5, max(k, 1))
    rows = max(1, -(-k // cols))
    fig = Figure(figsize=(1.9 * cols, 2.0 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= k:
            continue
        img = np.asarray(images[i], dtype=np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray_r" if img.shape[1] <= 8 else "gray")
        else:
            ax.imshow(np.transpose(img, (1, 2, 0)))
        ok = y_true[i] == y_pred[i]
        ax.set_title(f"{classes[y_true[i]]} → {classes[y_pred[i]]}", fontsize=9,
                     color="tab:green" if ok else "tab:red")
    if k == 0:
        axes[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title)
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
