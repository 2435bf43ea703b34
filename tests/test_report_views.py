"""Report views' info functions on literal studies (no training, no store), their registry, and
the study-file checks that name views and bundle parameters.

Each view is checked against numbers written down by hand: a literal trials table and literal
per-epoch histories go in, and the view's table must say what those numbers say.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pipeline.config import ConfigError
from pipeline.report.extract import StudyData
from pipeline.report.views import data as vd, registry as report_views
from pipeline.search.studyfile import load_study


def study(rows: list[dict], histories: dict[int, dict], space: dict) -> StudyData:
    """A StudyData from literal trials (``number``, ``state`` and parameters, plus any metric
    columns) and per-epoch histories (trial number -> {metric: [one value per epoch]})."""
    base = {"objective": math.nan, "test_acc": math.nan, "best_val_acc": math.nan,
            "n_params": math.nan, "run_id": "", "pruned_reason": ""}
    trials = pd.DataFrame([{**base, **r} for r in rows])
    hists = {}
    for number, cols in histories.items():
        n = len(next(iter(cols.values())))
        hists[number] = pd.DataFrame({"epoch": np.arange(1, n + 1, dtype=float),
                                      "step": np.arange(1, n + 1, dtype=float) * 10, **cols})
    return StudyData("lit", "run", {}, {}, trials, list(space), space, None, "val_acc",
                     "maximize", trial_histories=hists)


def cat(*choices) -> dict:
    return {"type": "categorical", "choices": list(choices)}


def render_all(name: str, info) -> list[tuple[str, str, Figure]]:
    figs = report_views.VIEWS[name].render(info)
    assert figs and all(isinstance(f, Figure) and caption for _, caption, f in figs)
    return figs


# -- curves (studies 1 and 5) ----------------------------------------------------------------


def test_curves_finds_the_slow_the_oscillating_and_the_diverged_rate():
    data = study(
        [{"number": 0, "state": "complete", "lr": 1e-5},
         {"number": 1, "state": "complete", "lr": 0.1},
         {"number": 2, "state": "pruned", "lr": 1.0, "pruned_reason": "diverged at epoch 3"},
         {"number": 3, "state": "complete", "lr": 0.5}],
        {0: {"train_loss": [2.30, 2.29, 2.28, 2.27], "val_acc": [0.1, 0.1, 0.11, 0.12]},
         1: {"train_loss": [1.0, 0.5, 0.6, 0.3, 0.2, 0.15, 0.1],
             "val_acc": [0.7, 0.9, 0.88, 0.9, 0.93, 0.95, 0.94]},
         2: {"train_loss": [3.0, 9.0, math.nan], "val_acc": [0.2, 0.1, math.nan]},
         3: {"train_loss": [2.0, 1.0, 2.5, 1.5, 2.6], "val_acc": [0.3, 0.5, 0.2, 0.4, 0.2]}},
        {"lr": cat(1e-5, 0.1, 0.5, 1.0)})
    info = vd.curves(data)
    table = info.tables["trials"].set_index("lr")
    assert list(table.index) == [1e-5, 0.1, 0.5, 1.0]  # sorted by the searched parameter
    assert table.loc[1e-5, "last_train_loss"] == pytest.approx(2.27)
    assert table.loc[0.1, "loss_rises"] == 1  # 0.5 -> 0.6
    assert table.loc[1.0, "diverged_at_epoch"] == 3
    assert math.isnan(table.loc[0.1, "diverged_at_epoch"])
    assert table.loc[0.1, "best_val_acc"] == pytest.approx(0.95)
    assert "Best: lr=0.1" in info.text
    assert "Too slow (training loss still above half its first value): lr=1e-05 (2.3 → 2.27)" \
        in info.text
    # 0.1 rose once in six epochs and ended far lower: neither slow nor unstable.
    assert "Unstable (training loss rising often, or ending higher): lr=0.5 (rose in 2 of 4 " \
        "epochs, 2 → 2.6)." in info.text
    assert "Diverged: lr=1 (epoch 3)" in info.text
    assert [f for f, _, _ in render_all("curves", info)] == ["curves"]


# -- overfitting (study 2) -------------------------------------------------------------------


def test_overfitting_marks_the_first_best_validation_epoch_not_a_test_one():
    data = study(
        [{"number": 0, "state": "complete", "objective": 0.9}],
        {0: {"train_loss": [1.0, 0.5, 0.2, 0.1, 0.05],
             "val_loss": [1.1, 0.6, 0.5, 0.7, 0.9],
             "epoch_test_loss": [1.1, 0.6, 0.55, 0.5, 0.45],
             "train_acc": [0.6, 0.8, 0.9, 0.95, 0.99],
             "val_acc": [0.6, 0.9, 0.85, 0.9, 0.8],  # best 0.9 first at epoch 2, again at 4
             "epoch_test_acc": [0.6, 0.8, 0.85, 0.95, 0.97]}},  # test keeps rising: ignored
        {})
    info = vd.overfitting(data)
    points = info.tables["points"].set_index("point")
    assert points.loc["early stopping (best val_acc)", "epoch"] == 2
    assert points.loc["lowest val_loss", "epoch"] == 3
    assert points.loc["last epoch", "epoch"] == 5
    assert points.loc["early stopping (best val_acc)", "epoch_test_acc"] == pytest.approx(0.8)
    assert info.plots["stop"] == 2 and "stops improving at epoch 2 of 5" in info.text
    render_all("overfitting", info)


# -- batch size (study 3) --------------------------------------------------------------------


def test_batch_size_puts_accuracy_time_and_noise_side_by_side():
    data = study(
        [{"number": 1, "state": "complete", "batch_size": 512, "test_acc": 0.8},
         {"number": 0, "state": "complete", "batch_size": 1, "test_acc": 0.9}],
        {0: {"train_loss": [0.5, 0.3], "train_loss_std": [0.8, 0.6],
             "epoch_seconds": [2.0, 3.0, ], "val_acc": [0.88, 0.91]},
         1: {"train_loss": [2.0, 1.8], "train_loss_std": [0.02, 0.04],
             "epoch_seconds": [0.1, 0.1], "val_acc": [0.5, 0.7]}},
        {"batch_size": cat(1, 512)})
    info = vd.batch_size(data)
    t = info.tables["trials"]
    assert list(t.batch_size) == [1, 512]
    assert list(t.seconds_per_epoch) == pytest.approx([2.5, 0.1])
    assert list(t.train_loss_std) == pytest.approx([0.7, 0.03])
    assert list(t.best_val_acc) == pytest.approx([0.91, 0.7])
    assert list(t.updates_per_epoch) == [10, 10]  # the first epoch's step
    assert "Best validation accuracy at batch size 1" in info.text
    assert [f for f, _, _ in render_all("batch_size", info)] == ["side_by_side", "noise"]


# -- width and depth (study 4) ---------------------------------------------------------------


def test_equal_parameter_pairs_are_found_from_the_logged_counts():
    table = pd.DataFrame({"depth": [1, 2, 2, 1], "width": [64, 41, 59, 128],
                          "n_params": [4810, 4807, 7975, 9610],
                          "best_val_acc": [0.95, 0.96, 0.97, 0.97]})
    pairs = vd.equal_param_pairs(table)
    assert pairs[["shallow", "deep"]].values.tolist() == [["1x64", "2x41"]]
    assert pairs.deep_minus_shallow.iloc[0] == pytest.approx(0.01)
    assert len(vd.equal_param_pairs(table, tolerance=0.2)) == 2  # and 1x128 vs 2x59 (17 %)


def test_width_depth_table_grid_and_gradients_of_the_deep_nets():
    rows, hists = [], {}
    for number, (depth, width, n, acc) in enumerate(
            [(1, 16, 1210, 0.90), (1, 64, 4810, 0.95), (1, 256, 19210, 0.96),
             (2, 41, 4807, 0.96), (4, 64, 17290, 0.93)]):
        rows.append({"number": number, "state": "complete", "depth": depth, "width": width,
                     "n_params": n, "best_val_acc": acc, "test_acc": acc - 0.01})
        hists[number] = {"val_acc": [acc - 0.1, acc]}
    layers = {f"grad_norm/fc{i}": [10.0 ** -(5 - i), 10.0 ** -(5 - i)] for i in range(1, 5)}
    hists[4] |= {**layers, "grad_norm/out": [1.0, 0.5]}
    data = study(rows, hists, {"width": cat(16, 41, 64, 256), "depth": cat(1, 2, 4)})
    info = vd.width_depth(data)
    t = info.tables["trials"]
    assert list(zip(t.depth, t.width, t.n_params)) == [
        (1, 16, 1210), (1, 64, 4810), (1, 256, 19210), (2, 41, 4807), (4, 64, 17290)]
    grid = info.tables["val_acc_by_depth_width"]
    assert grid.loc[2, 41] == pytest.approx(0.96) and math.isnan(grid.loc[2, 16])
    assert info.tables["equal_param_pairs"][["shallow", "deep"]].values.tolist() == [
        ["1x64", "2x41"]]
    # Deep nets (depth >= 4) at the width nearest the geometric middle of 16 ... 256: 64.
    assert list(info.plots["grads"]) == ["depth 4, width 64"]
    ratio = info.tables["gradient_ratio"].iloc[0]
    assert ratio.first_over_last_layer_start == pytest.approx(1e-4)
    assert ratio.first_over_last_layer_end == pytest.approx(2e-4)
    assert [f for f, _, _ in render_all("width_depth", info)] == ["accuracy", "gradients"]


# -- ablation (study 6) ----------------------------------------------------------------------


def test_ablation_keeps_the_file_order_and_says_what_each_stage_adds():
    stages = {"baseline": {"activation": "sigmoid", "optimizer": "sgd"},
              "+tanh": {"activation": "lecun_tanh", "optimizer": "sgd"},
              "+momentum": {"activation": "lecun_tanh", "optimizer": "momentum"}}
    data = study(  # trial numbers in another order than the stages: the grid's order
        [{"number": 0, "state": "complete", "stage": "+momentum", "test_acc": 0.95},
         {"number": 1, "state": "complete", "stage": "baseline", "test_acc": 0.5},
         {"number": 2, "state": "complete", "stage": "+tanh", "test_acc": 0.9}],
        {0: {"val_acc": [0.92, 0.96]}, 1: {"val_acc": [0.3, 0.52]}, 2: {"val_acc": [0.8, 0.93]}},
        {"stage": {"type": "bundle", "choices": stages}})
    info = vd.ablation(data)
    t = info.tables["stages"]
    assert list(t.order) == [1, 2, 3]
    assert list(t.stage) == ["baseline", "+tanh", "+momentum"]
    assert list(t.adds) == ["(baseline)", "activation=lecun_tanh", "optimizer=momentum"]
    assert list(t.best_val_acc) == pytest.approx([0.52, 0.93, 0.96])
    assert list(t.val_acc_gain.iloc[1:]) == pytest.approx([0.41, 0.03])
    # first epoch at 95 % of the best stage's 0.96 (0.912): never, epoch 2, epoch 1
    assert t.epochs_to_target.tolist()[1:] == [2, 1] and math.isnan(t.epochs_to_target[0])
    assert "Largest gain: +tanh" in info.text
    render_all("ablation", info)


# -- training-set size (study 7) -------------------------------------------------------------


def test_train_size_gap_is_train_accuracy_at_the_selected_epoch_minus_test():
    data = study(
        [{"number": 0, "state": "complete", "n_per_class": 100, "test_acc": 0.85},
         {"number": 1, "state": "complete", "n_per_class": 10, "test_acc": 0.6}],
        {0: {"train_acc": [0.8, 0.9, 0.97], "val_acc": [0.8, 0.86, 0.85]},
         1: {"train_acc": [0.7, 1.0, 1.0], "val_acc": [0.62, 0.61, 0.6]}},
        {"n_per_class": cat(10, 100)})
    t = vd.train_size(data).tables["trials"]
    assert list(t.n_per_class) == [10, 100]
    assert list(t.selected_epoch) == [1, 2]
    assert list(t.gap) == pytest.approx([0.7 - 0.6, 0.9 - 0.85])
    render_all("train_size", vd.train_size(data))


# -- registry and study files ----------------------------------------------------------------


def test_views_of_reads_the_report_key_of_a_logged_study_file():
    assert report_views.views_of("name: x\nreport: {views: [curves, ablation]}\n") == [
        "curves", "ablation"]
    assert report_views.views_of("name: x\n") == []


def test_every_registered_view_has_a_title_info_render_and_metric_names():
    for name, view in report_views.VIEWS.items():
        assert view.title and callable(view.info) and callable(view.render), name
        assert all(isinstance(m, str) and m for m in view.metrics), name


def write(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_view_and_bad_bundles_are_listed_at_once(tmp_path):
    path = write(tmp_path, """
name: s
sampler: {name: grid}
n_trials: 3
fixed: {lr: 0.1, schedule: constant}
space:
  stage:
    type: bundle
    choices:
      a: {activation: relu}
      b: {activation: swish, lr: 0.2, colour: red}
report: {views: [curves, no_such_view]}
""")
    with pytest.raises(ConfigError) as err:
        load_study(path)
    text = str(err.value)
    assert "report.views: unknown view 'no_such_view' (known: curves," in text
    assert "space.stage: choice 'b': unknown training settings ['colour']" in text
    assert "space.stage.b: sets lr, also given in fixed; keep one" in text
    assert "space.stage.b: activation:" in text  # swish is not an activation
    assert "n_trials: 3 is more than the grid's 2 points; set n_trials: 2" in text


def test_a_bundle_choice_expands_into_its_settings(tmp_path):
    cfg = load_study(write(tmp_path, """
name: s
sampler: {name: grid}
n_trials: 2
fixed: {lr: 0.1, schedule: constant}
space:
  stage:
    type: bundle
    choices:
      plain: {activation: sigmoid, batch_norm: false}
      tricks: {activation: lecun_tanh, batch_norm: true}
"""))
    train = cfg.train_config({"stage": "tricks", "seed": 3})
    assert (train.activation, train.batch_norm, train.lr, train.seed) == ("lecun_tanh", True,
                                                                          0.1, 3)
