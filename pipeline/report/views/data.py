"""The info step of the study catalogue's report views: pure functions StudyData -> ViewInfo.

No plotting and no store here (see pipeline.report.views.registry for how views are registered);
each function reads ``data.trials`` (one row per trial, searched parameters as columns) and
``data.trial_histories`` (every trial's per-epoch metrics) and returns the answer as text, the
tables to print and the data its figures draw.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.report.extract import StudyData, ViewInfo

EQUAL_PARAMS_TOLERANCE = 0.02  # two nets "have equal parameters" within 2 % of each other


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def label(row, names) -> str:
    """A trial named by its searched parameters, e.g. ``optimizer=adam lr=0.001``."""
    return " ".join(f"{n}={_fmt(row[n])}" for n in names if n in row) or f"#{row['number']}"


def _history(data: StudyData, number: int) -> pd.DataFrame:
    hist = data.trial_histories.get(int(number))
    if hist is None:
        hist = data.histories.get(int(number), pd.DataFrame())
    if "epoch" not in hist and "step" in hist:
        hist = hist.assign(epoch=range(1, len(hist) + 1))
    return hist.sort_values("epoch").reset_index(drop=True) if "epoch" in hist else hist


def _sorted_trials(data: StudyData, states=("complete", "pruned")) -> pd.DataFrame:
    t = data.trials[data.trials.state.isin(states)]
    keys = [n for n in data.param_names if n in t]
    return t.sort_values([*keys, "number"]).reset_index(drop=True)


def _col(hist: pd.DataFrame, name: str) -> pd.Series:
    return hist[name] if name in hist else pd.Series(np.nan, index=hist.index)


def diverged_epoch(hist: pd.DataFrame) -> float:
    """The first epoch whose training or validation loss is not finite (NaN: none)."""
    bad = ~np.isfinite(_col(hist, "train_loss").astype(float))
    if "val_loss" in hist:  # a diverged epoch logs no validation metrics at all
        bad |= hist.val_loss.notna() & ~np.isfinite(hist.val_loss.astype(float))
    return float(hist.epoch[bad].iloc[0]) if bad.any() else math.nan


# -- 1 and 5: every trial's curves on one figure ---------------------------------------------


def curves(data: StudyData) -> ViewInfo:
    """Learning curves of every trial, and per trial: how far its training loss fell, how often
    it rose from one epoch to the next (oscillation), and whether it diverged."""
    rows, lines = [], {}
    for _, t in _sorted_trials(data).iterrows():
        hist = _history(data, t.number)
        if hist.empty:
            continue
        loss = _col(hist, "train_loss").astype(float)
        finite = loss[np.isfinite(loss)]
        name = label(t, data.param_names)
        lines[name] = hist
        rows.append({**{n: t[n] for n in data.param_names}, "state": t.state,
                     "epochs_run": len(hist),
                     "first_train_loss": finite.iloc[0] if len(finite) else math.nan,
                     "last_train_loss": finite.iloc[-1] if len(finite) else math.nan,
                     "loss_rises": int((finite.diff() > 0).sum()),
                     "best_val_acc": float(_col(hist, "val_acc").max()),
                     "diverged_at_epoch": diverged_epoch(hist)})
    table = pd.DataFrame(rows)
    return ViewInfo(_curves_text(table, data.param_names), {"trials": table},
                    {"lines": lines, "diverged": dict(zip(lines, table.get(
                        "diverged_at_epoch", [])))})


SLOW_RATIO = 0.5  # "too slow": training loss ended above half its first-epoch value ...
UNSTABLE_RISES = 0.2  # ... "unstable": it rose from one epoch to the next this often, or ended
                      # above where it started. Words for the text only; the table has the numbers.


def _curves_text(table: pd.DataFrame, names) -> str:
    if table.empty:
        return "No trial logged any epoch."
    parts = []
    if table.best_val_acc.notna().any():
        best = table.loc[table.best_val_acc.idxmax()]
        parts.append(f"Best: {label(best, names)} (validation accuracy {best.best_val_acc:.4f}).")
    ok = table[table.diverged_at_epoch.isna() & (table.epochs_run > 1)]
    rises = ok.loss_rises / (ok.epochs_run - 1)
    unstable = ok[(rises >= UNSTABLE_RISES) | (ok.last_train_loss > ok.first_train_loss)]
    slow = ok[(ok.last_train_loss > SLOW_RATIO * ok.first_train_loss)
              & ~ok.index.isin(unstable.index)]
    if len(slow):
        parts.append("Too slow (training loss still above half its first value): " + ", ".join(
            f"{label(r, names)} ({r.first_train_loss:.3g} → {r.last_train_loss:.3g})"
            for _, r in slow.iterrows()) + ".")
    if len(unstable):
        parts.append("Unstable (training loss rising often, or ending higher): " + ", ".join(
            f"{label(r, names)} (rose in {r.loss_rises} of {r.epochs_run - 1} epochs, "
            f"{r.first_train_loss:.3g} → {r.last_train_loss:.3g})"
            for _, r in unstable.iterrows()) + ".")
    bad = table[table.diverged_at_epoch.notna()]
    if len(bad):
        parts.append("Diverged: " + ", ".join(
            f"{label(r, names)} (epoch {int(r.diverged_at_epoch)})" for _, r in bad.iterrows())
            + ".")
    return " ".join(parts)


# -- 2: one configuration trained long ------------------------------------------------------


def overfitting(data: StudyData) -> ViewInfo:
    """Train / validation / test curves of the selected trial, and where validation stopped
    improving. The early-stopping epoch is the trainer's own choice (the first epoch of best
    validation accuracy); the test curve is for reporting only and chooses nothing."""
    hist = _history(data, data.best.number)
    cols = ["epoch", "train_loss", "val_loss", "epoch_test_loss", "train_acc", "val_acc",
            "epoch_test_acc"]
    hist = hist[[c for c in cols if c in hist]].dropna(subset=["val_acc"])
    stop = int(hist.epoch[hist.val_acc.idxmax()])  # idxmax: the first of equal maxima
    lowest = int(hist.epoch[hist.val_loss.idxmin()])
    last = int(hist.epoch.iloc[-1])
    points = pd.DataFrame([{"point": name, **hist[hist.epoch == e].iloc[0].to_dict()}
                           for name, e in (("early stopping (best val_acc)", stop),
                                           ("lowest val_loss", lowest), ("last epoch", last))])
    points["epoch"] = points.epoch.astype(int)
    at = points.set_index("point")
    end, best = at.loc["last epoch"], at.loc["early stopping (best val_acc)"]
    text = (f"Validation accuracy stops improving at epoch {stop} of {last} "
            f"({best.val_acc:.4f}, {end.val_acc:.4f} at the end); validation loss is lowest at "
            f"epoch {lowest} ({at.loc['lowest val_loss'].val_loss:.3g}, {end.val_loss:.3g} at the "
            f"end) while training loss keeps falling ({hist.train_loss.iloc[0]:.3g} → "
            f"{end.train_loss:.3g}).")
    if "epoch_test_acc" in at:
        text += (f" Test accuracy at the early-stopping epoch {best.epoch_test_acc:.4f}, at the "
                 f"end {end.epoch_test_acc:.4f} (measured every epoch for this plot only).")
    return ViewInfo(text, {"points": points}, {"history": hist, "stop": stop, "lowest": lowest})


# -- 3: batch size --------------------------------------------------------------------------


def batch_size(data: StudyData) -> ViewInfo:
    """Per batch size: accuracy, wall time per epoch and the training loss's step-to-step
    standard deviation (mean over epochs), side by side."""
    rows, hists = [], {}
    for _, t in _sorted_trials(data).iterrows():
        hist = _history(data, t.number)
        if hist.empty:
            continue
        hists[int(t.batch_size)] = hist
        rows.append({"batch_size": int(t.batch_size), "state": t.state,
                     "updates_per_epoch": int(hist.step.iloc[0]) if "step" in hist else None,
                     "best_val_acc": float(_col(hist, "val_acc").max()),
                     "test_acc": t.test_acc,
                     "seconds_per_epoch": float(_col(hist, "epoch_seconds").median()),
                     "train_loss_std": float(_col(hist, "train_loss_std").mean()),
                     "last_train_loss": float(_col(hist, "train_loss").iloc[-1])})
    table = pd.DataFrame(rows)
    text = ""
    if len(table):
        best = table.loc[table.best_val_acc.idxmax()]
        lo, hi = table.iloc[0], table.iloc[-1]
        text = (f"Best validation accuracy at batch size {best.batch_size} "
                f"({best.best_val_acc:.4f}). From batch size {lo.batch_size} to "
                f"{hi.batch_size}: {lo.seconds_per_epoch:.3g} s → {hi.seconds_per_epoch:.3g} s "
                f"per epoch, training-loss noise (std between steps) {lo.train_loss_std:.3g} → "
                f"{hi.train_loss_std:.3g}.")
    return ViewInfo(text, {"trials": table}, {"table": table, "histories": hists})


# -- 4: width and depth ---------------------------------------------------------------------


def equal_param_pairs(table: pd.DataFrame, tolerance: float = EQUAL_PARAMS_TOLERANCE
                      ) -> pd.DataFrame:
    """Pairs of trials of different depth whose parameter counts are within ``tolerance``."""
    rows = []
    t = table.sort_values(["depth", "width"]).reset_index(drop=True)
    for i, a in t.iterrows():
        for _, b in t.iloc[i + 1:].iterrows():
            if a.depth == b.depth or abs(a.n_params - b.n_params) > tolerance * max(
                    a.n_params, b.n_params):
                continue
            rows.append({"shallow": f"{a.depth:.0f}x{a.width:.0f}",
                         "shallow_params": int(a.n_params), "shallow_val_acc": a.best_val_acc,
                         "deep": f"{b.depth:.0f}x{b.width:.0f}", "deep_params": int(b.n_params),
                         "deep_val_acc": b.best_val_acc,
                         "deep_minus_shallow": b.best_val_acc - a.best_val_acc})
    return pd.DataFrame(rows, columns=["shallow", "shallow_params", "shallow_val_acc", "deep",
                                       "deep_params", "deep_val_acc", "deep_minus_shallow"])


def _grad_columns(hist: pd.DataFrame) -> list[str]:
    from pipeline.figures import _layer_order

    return sorted((c for c in hist if c.startswith("grad_norm/")),
                  key=lambda c: _layer_order(c.split("/", 1)[1]))


def width_depth(data: StudyData, deep_from: int = 4) -> ViewInfo:
    """Parameter counts (as the trainer counted them) and accuracy of every width x depth, the
    equal-parameter pairs among them, and per-layer gradient magnitudes of the deep nets."""
    t = _sorted_trials(data).sort_values(["depth", "width"]).reset_index(drop=True)
    table = pd.DataFrame({"depth": t.depth.astype(int), "width": t.width.astype(int),
                          "n_params": t.n_params.astype("Int64"), "state": t.state,
                          "best_val_acc": t.best_val_acc, "test_acc": t.test_acc})
    done = table[table.best_val_acc.notna()]
    grid = done.pivot_table(index="depth", columns="width", values="best_val_acc")
    pairs = equal_param_pairs(done)
    # Deep nets at one width: one panel per depth.
    grads, ratios = {}, []
    widths = sorted(done.width.unique())
    if widths:  # the width nearest the geometric middle of the range (64 for 16 ... 256)
        mid = min(widths, key=lambda w: abs(math.log(w) - math.log(widths[0] * widths[-1]) / 2))
        for _, r in t[(t.depth >= deep_from) & (t.width == mid)].iterrows():
            hist = _history(data, r.number)
            cols = _grad_columns(hist)
            if not cols:
                continue
            grads[f"depth {int(r.depth)}, width {int(r.width)}"] = hist[["step", *cols]]
            first, out = hist[cols[0]], hist[cols[-1]]
            ratios.append({"depth": int(r.depth), "width": int(r.width),
                           "first_over_last_layer_start": float(first.iloc[0] / out.iloc[0]),
                           "first_over_last_layer_end": float(first.iloc[-1] / out.iloc[-1])})
    tables = {"trials": table, "val_acc_by_depth_width": grid, "equal_param_pairs": pairs}
    if ratios:
        tables["gradient_ratio"] = pd.DataFrame(ratios)
    text = ""
    if len(done):
        best = done.loc[done.best_val_acc.idxmax()]
        text = (f"Best: depth {best.depth}, width {best.width} ({best.best_val_acc:.4f}, "
                f"{best.n_params:,} parameters). ")
        text += "".join(f"At equal parameters, {p.deep} vs {p.shallow}: "
                        f"{p.deep_minus_shallow:+.4f} validation accuracy. "
                        for _, p in pairs.iterrows())
        text += "".join(f"Depth {r['depth']}: the first layer's gradient is "
                        f"{r['first_over_last_layer_start']:.3g}× the output layer's at the "
                        f"start. " for r in ratios)
    return ViewInfo(text.strip(), tables, {"table": done, "grads": grads})


# -- 6: cumulative ablation -----------------------------------------------------------------


def _stage_param(data: StudyData) -> str:
    bundles = [n for n, s in data.space.items() if s.get("type") == "bundle"]
    return (bundles or data.param_names or ["number"])[0]


TARGET_SHARE = 0.95  # convergence speed: first epoch within 95 % of the study's best accuracy


def ablation(data: StudyData) -> ViewInfo:
    """Stages in the order the study file lists them, each adding settings on top of the
    previous one: accuracy, the change from the previous stage, what the stage adds, and how
    fast it converges (the first epoch whose validation accuracy reaches TARGET_SHARE of the
    best any stage reached: tricks that end equal often differ there)."""
    param = _stage_param(data)
    spec = data.space.get(param, {})
    choices = spec.get("choices", [])
    order = list(choices) if choices else sorted(data.trials[param].unique())
    settings = choices if isinstance(choices, dict) else {}
    rows, hists, previous = [], {}, {}
    for stage, name in enumerate(order, 1):
        match = data.trials[(data.trials[param] == name) & data.trials.state.isin(
            ("complete", "pruned"))]
        bundle = settings.get(name, {})
        adds = ", ".join(f"{k}={v}" for k, v in bundle.items() if previous.get(k) != v)
        previous = bundle
        if match.empty:
            continue
        t = match.iloc[-1]
        hist = _history(data, t.number)
        hists[name] = hist
        rows.append({"order": stage, param: name, "adds": adds if stage > 1 else "(baseline)",
                     "state": t.state, "best_val_acc": float(_col(hist, "val_acc").max()),
                     "test_acc": t.test_acc})
    table = pd.DataFrame(rows)
    if len(table):
        table["val_acc_gain"] = table.best_val_acc.diff()
        target = TARGET_SHARE * table.best_val_acc.max()
        table["epochs_to_target"] = [_first_epoch_at(hists[n], target) for n in table[param]]
    text = ""
    if len(table) > 1:
        top = table.loc[table.val_acc_gain.idxmax()]
        text = ("Validation accuracy by stage: " + " → ".join(
            f"{v:.4f}" for v in table.best_val_acc) + f". Largest gain: {top[param]} "
            f"({top.val_acc_gain:+.4f}, adds {top.adds}).")
    return ViewInfo(text, {"stages": table}, {"table": table, "histories": hists,
                                              "param": param})


def _first_epoch_at(hist: pd.DataFrame, target: float) -> float:
    reached = hist.epoch[_col(hist, "val_acc") >= target]
    return float(reached.iloc[0]) if len(reached) else math.nan


# -- 7: training-set size -------------------------------------------------------------------


def train_size(data: StudyData) -> ViewInfo:
    """Per class-balanced subset size: training accuracy at the selected epoch (as measured
    during that epoch), test accuracy of the selected model, and the gap between them."""
    rows = []
    for _, t in _sorted_trials(data, ("complete",)).iterrows():
        hist = _history(data, t.number).dropna(subset=["val_acc"])
        at = hist.loc[hist.val_acc.idxmax()]  # the selected epoch, as the trainer chose it
        rows.append({"n_per_class": int(t.n_per_class), "selected_epoch": int(at.epoch),
                     "train_acc": float(at.train_acc), "best_val_acc": float(at.val_acc),
                     "test_acc": t.test_acc, "gap": float(at.train_acc) - t.test_acc})
    table = pd.DataFrame(rows)
    text = " ".join(f"{r.n_per_class} per class: train {r.train_acc:.4f}, test {r.test_acc:.4f}, "
                    f"gap {r.gap:+.4f}." for r in table.itertuples())
    return ViewInfo(text, {"trials": table}, {"table": table})
