"""The render step of the study catalogue's report views: ViewInfo -> [(stem, caption, Figure)].

Object-oriented matplotlib only. matplotlib and seaborn are imported inside the functions: study
validation imports the view registry, and should not pay for a plotting stack.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.report.extract import ViewInfo


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kw)


def _palette(n: int):
    import seaborn as sns

    return sns.color_palette("viridis" if n > 10 else "tab10", max(n, 1))


def _plain_log_ticks(ax) -> None:
    """Log axes labelled 0.5, 2, 10 rather than 5x10^-1 (few decades on these axes)."""
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def curves(info: ViewInfo) -> list:
    lines, diverged = info.plots["lines"], info.plots["diverged"]
    fig = _figure(figsize=(13, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for color, (name, hist) in zip(_palette(len(lines)), lines.items()):
        loss = hist.train_loss.where(np.isfinite(hist.train_loss))
        ax_loss.plot(hist.epoch, loss, color=color, label=name)
        if "val_acc" in hist:
            ax_acc.plot(hist.epoch, hist.val_acc, color=color, label=name)
        if not math.isnan(diverged.get(name, math.nan)):  # an x where it stopped
            last = loss.last_valid_index()
            if last is not None:
                ax_loss.scatter(hist.epoch[last], loss[last], marker="x", s=80, color=color)
    ax_loss.set(xlabel="epoch", ylabel="training loss (log)", yscale="log",
                title="Training loss (× = diverged after this epoch)")
    _plain_log_ticks(ax_loss)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    return [("curves", "Every trial on one figure: a flat curve learns too slowly, a jagged one "
             "oscillates, a curve that stops with an × diverged.", fig)]


def overfitting(info: ViewInfo) -> list:
    hist, stop, lowest = info.plots["history"], info.plots["stop"], info.plots["lowest"]
    fig = _figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("loss", "acc"), ("Loss (cross-entropy)", "Accuracy")):
        for col, name, color in ((f"train_{key}", "train", "tab:blue"),
                                 (f"val_{key}", "validation", "tab:orange"),
                                 (f"epoch_test_{key}", "test", "tab:green")):
            if col in hist:
                ax.plot(hist.epoch, hist[col], color=color, label=name)
        ax.axvline(stop, color="black", ls="--", label=f"early stopping (epoch {stop})")
        if key == "loss" and lowest != stop:
            ax.axvline(lowest, color="0.5", ls=":", label=f"lowest val loss (epoch {lowest})")
        ax.set(xlabel="epoch", ylabel=title, title=title)
        if key == "loss":  # a falling training loss and a rising validation loss, both visible
            ax.set(yscale="log", ylabel=f"{title} (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [("curves", "Train, validation and test over epochs; the dashed line is where "
             "validation accuracy stopped improving (the epoch early stopping keeps). Test is "
             "drawn for reporting only; it chose nothing.", fig)]


def batch_size(info: ViewInfo) -> list:
    table, hists = info.plots["table"], info.plots["histories"]
    fig = _figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    panels = ((("best_val_acc", "validation"), ("test_acc", "test")), "accuracy"), \
        ((("seconds_per_epoch", None),), "seconds per epoch"), \
        ((("train_loss_std", None),), "training-loss std between steps")
    for ax, (series, ylabel) in zip(axes, panels):
        for col, name in series:
            ax.plot(table.batch_size, table[col], "-o", label=name)
        ax.set(xscale="log", xlabel="batch size (log)", ylabel=ylabel, title=ylabel)
        ax.set_xticks(table.batch_size, [str(b) for b in table.batch_size])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    out = [("side_by_side", "Accuracy, wall time per epoch and noisiness of the training loss "
            "by batch size, at the same number of epochs.", fig)]
    fig2 = _figure(figsize=(7, 4))
    ax = fig2.subplots()
    for color, (bs, hist) in zip(_palette(len(hists)), hists.items()):
        if "train_loss_std" in hist:
            ax.plot(hist.epoch, hist.train_loss_std, color=color, label=f"batch {bs}")
    ax.set(xlabel="epoch", ylabel="std of the training loss between steps", yscale="log",
           title="Training-loss noise over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.append(("noise", "Standard deviation of the per-step training loss within each epoch: "
                "small batches give noisy gradient estimates.", fig2))
    return out


def width_depth(info: ViewInfo) -> list:
    import seaborn as sns

    table, grads = info.plots["table"], info.plots["grads"]
    fig = _figure(figsize=(13, 4.6))
    ax_map, ax_n = fig.subplots(1, 2)
    grid = info.tables["val_acc_by_depth_width"]
    if not grid.empty:
        sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", ax=ax_map,
                    cbar_kws={"label": "best validation accuracy"})
    ax_map.set(title="Validation accuracy by depth and width", xlabel="width", ylabel="depth")
    for color, (depth, group) in zip(_palette(table.depth.nunique()), table.groupby("depth")):
        ax_n.plot(group.n_params.astype(float), group.best_val_acc, "-o", color=color,
                  label=f"depth {depth}")
    ax_n.set(xscale="log", xlabel="parameters (log)", ylabel="best validation accuracy",
             title="Accuracy against parameter count")
    ax_n.grid(alpha=0.3)
    ax_n.legend(fontsize=8)
    out = [("accuracy", "Accuracy of every width × depth, and against parameter count: at equal "
            "parameters (same x), which depth wins?", fig)]
    if grads:
        fig2 = _figure(figsize=(6 * len(grads), 4))
        axes = np.atleast_1d(fig2.subplots(1, len(grads)))
        for ax, (name, hist) in zip(axes, grads.items()):
            cols = [c for c in hist if c.startswith("grad_norm/")]
            for color, col in zip(_palette(len(cols)), cols):
                ax.plot(hist.step, hist[col], color=color, label=col.split("/", 1)[1])
            ax.set(xlabel="update step", ylabel="RMS gradient norm (log)", yscale="log",
                   title=name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        out.append(("gradients", "Per-layer gradient magnitude of the deep nets over training: "
                    "layers orders of magnitude apart are vanishing or exploding gradients.",
                    fig2))
    return out


def ablation(info: ViewInfo) -> list:
    table, hists, param = info.plots["table"], info.plots["histories"], info.plots["param"]
    fig = _figure(figsize=(13, 4.4))
    ax_bar, ax_curve = fig.subplots(1, 2)
    if len(table):
        x = np.arange(len(table))
        ax_bar.bar(x - 0.2, table.best_val_acc, 0.4, label="validation")
        ax_bar.bar(x + 0.2, table.test_acc.astype(float), 0.4, label="test")
        ax_bar.set_xticks(x, [str(v) for v in table[param]], rotation=20, ha="right")
        low = float(min(table.best_val_acc.min(), table.test_acc.astype(float).min()))
        ax_bar.set_ylim(max(0.0, low - 0.05), 1.0)
        ax_bar.legend()
    ax_bar.set(ylabel="accuracy", title="Each stage adds one trick to the previous")
    ax_bar.grid(alpha=0.3, axis="y")
    for color, (name, hist) in zip(_palette(len(hists)), hists.items()):
        if "val_acc" in hist:
            ax_curve.plot(hist.epoch, hist.val_acc, color=color, label=name)
    ax_curve.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    return [("stages", "Cumulative ablation: accuracy of each stage and its validation curve; "
             "the table says what each stage adds.", fig)]


def train_size(info: ViewInfo) -> list:
    table = info.plots["table"]
    fig = _figure(figsize=(7, 4.4))
    ax = fig.subplots()
    if len(table):
        ax.plot(table.n_per_class, table.train_acc, "-o", label="train (selected epoch)")
        ax.plot(table.n_per_class, table.test_acc, "-s", label="test")
        ax.fill_between(table.n_per_class, table.test_acc.astype(float),
                        table.train_acc.astype(float), alpha=0.15, label="gap")
        ax.set_xticks(table.n_per_class, [str(n) for n in table.n_per_class])
    ax.set(xscale="log", xlabel="training examples per class (log)", ylabel="accuracy",
           title="Train vs test accuracy by training-set size")
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    return [("gap", "Training and test accuracy of the selected model for each class-balanced "
             "subset: the shaded gap is what more data closes.", fig)]
