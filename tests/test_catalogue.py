"""The study catalogue end to end: every shipped study file runs in smoke mode on digits through
the search CLI, then the report CLI writes the standard report and the study's own views, whose
tables must agree with what the trainer logged.

All studies share one tmp store (module-scoped), and both CLIs run in-process through their
``main``: a study whose chain needs a parent or source finds it already run. Study files without
views are left to test_search (smoke run) and test_report (standard report); so are the standard
figures that do not depend on the shape of a study's space, which are skipped here for time.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from search_fixtures import (
    STUDIES,
    Outcome,
    children,
    fresh_store,
    load,
    one_torch_thread,  # noqa: F401  (autouse)
    run_report,
    run_search,
    store_uri,
    study_runs,
)

from pipeline.config import TrainConfig
from pipeline.report import build as report, cli as report_cli
from pipeline.report.views.registry import VIEWS
from pipeline.search.plan import study_key
from pipeline.search.studyfile import load_study, smoke_config
from pipeline.training.models import build_model, count_params
from pipeline.training.trainer import train

VIEW_STUDIES = [p for p in sorted(STUDIES.glob("*.yaml")) if load_study(p.stem).report.views]
# Standard figures that read the searched parameters (bundles, empty spaces, grids) or the
# schedule, and the example grids; test_report draws the others on a real smoke study.
SHAPE_FIGURES = ("objective_vs_params", "pair", "parallel_coordinates", "importance",
                 "lr_schedule", "misclassified", "correct")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, empty_mlflow_db):
    """``run(stem)``: smoke-run a shipped study on digits and report it, once per module."""
    folder = tmp_path_factory.mktemp("catalogue")
    client = fresh_store(folder, empty_mlflow_db)
    done = {}

    def run(stem: str):
        if stem not in done:
            cfg = load_study(stem)
            key = study_key(cfg.name, cfg.dataset, "digits", smoke=True)
            search = run_search(folder, "--study", stem, "--smoke", "--dataset", "digits")
            assert search.code == 0, search.err
            check_smoke_runs(folder, client, cfg)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(report, "STUDY_FIGURES", SHAPE_FIGURES)
                result = run_report(folder, "--study", key, "--no-log")
            assert result.code == 0, result.err
            done[stem] = (cfg, key, folder / "reports" / key)
        return done[stem]

    run.client = client
    return run


def check_smoke_runs(folder: Path, client, cfg) -> None:
    """What test_search checks of every other shipped study: the study and its parents or
    sources ran in smoke mode on digits, every trial finished in at most two epochs, and each
    trial is a finished child run of its study's run."""
    chain, todo = [], [cfg]
    while todo:
        c = todo.pop()
        chain.append(c)
        todo += [load_study(name) for name in (c.parent, c.source) if name]
    for c in chain:
        key = study_key(c.name, c.dataset, "digits", smoke=True)
        size = smoke_config(c.model_copy(update={"dataset": "digits"})).n_trials
        study = load(folder, key)
        assert len(study.trials) == size, key
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
        assert all(max(t.intermediate_values) <= 2 for t in study.trials)
        (run,) = study_runs(client, key)
        assert (run.info.status, run.info.run_name) == ("FINISHED", key)
        assert len(children(client, run.info.run_id)) == size


def trial_runs(client, key: str) -> dict[int, object]:
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`pipeline.study` = '{key}' and tags.`pipeline.kind` = 'trial'")
    return {int(r.data.tags["pipeline.trial_number"]): r for r in runs}


def test_every_study_file_of_the_catalogue_asks_for_a_view():
    stems = {p.stem for p in VIEW_STUDIES}
    assert {"learning_rate", "epochs", "batch_size", "width_depth", "optimizers", "ablation",
            "train_size"} <= stems


@pytest.mark.parametrize("path", VIEW_STUDIES, ids=lambda p: p.stem)
def test_every_study_runs_in_smoke_mode_and_reports_its_views(path, catalogue):
    cfg, key, folder = catalogue(path.stem)
    md = (folder / "report.md").read_text()
    assert (folder / "index.html").is_file() and (folder / "misclassified.png").is_file()
    assert (folder / "correct.png").is_file()  # the correctly classified example grid
    for view in cfg.report.views:
        assert f"## {VIEWS[view].title}" in md, view
        figures = sorted(folder.glob(f"{view}_*.png"))
        assert figures, f"view {view} drew no figure"
        assert all(f"![{f.name}]({f.name})" in md for f in figures)


def table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}.csv")


def test_width_depth_table_counts_parameters_as_the_model_does(catalogue):
    cfg, key, folder = catalogue("width_depth")
    t = table(folder, "width_depth_trials")
    assert len(t) == 3  # the smoke run's three grid points
    for row in t.itertuples():
        model = build_model(TrainConfig(depth=row.depth, width=row.width), (1, 8, 8), 10)
        assert row.n_params == count_params(model), row
    assert set(t.width) <= {16, 32, 41, 59, 64, 128, 256} and set(t.depth) <= {1, 2, 4, 6, 10}


def test_learning_rate_and_optimizer_curves_have_one_row_per_trial(catalogue):
    for stem, params in (("learning_rate", ["lr"]), ("optimizers", ["optimizer", "lr"])):
        cfg, key, folder = catalogue(stem)
        t = table(folder, "curves_trials")
        runs = trial_runs(catalogue.client, key)
        assert len(t) == len(runs) == 3
        assert list(t.columns[:len(params)]) == params
        assert (t.epochs_run == 2).all()  # smoke: two epochs
        logged = sorted(float(r.data.params["lr"]) for r in runs.values())
        assert sorted(t.lr) == pytest.approx(logged)


def test_overfitting_marks_the_epoch_the_trainer_kept(catalogue):
    cfg, key, folder = catalogue("epochs")
    points = table(folder, "overfitting_points").set_index("point")
    (run,) = trial_runs(catalogue.client, key).values()
    stop = points.loc["early stopping (best val_acc)"]
    assert stop.epoch == run.data.metrics["best_epoch"]
    assert stop.val_acc == pytest.approx(run.data.metrics["best_val_acc"])
    assert 0 < stop.epoch_test_acc <= 1  # the per-epoch test curve was logged


def test_batch_size_view_reports_time_and_noise_of_each_batch_size(catalogue):
    cfg, key, folder = catalogue("batch_size")
    t = table(folder, "batch_size_trials")
    assert len(t) == 3 and set(t.batch_size) <= {1, 8, 32, 128, 512}
    assert (t.seconds_per_epoch > 0).all()
    n_train = 1149  # digits' training split
    assert list(t.updates_per_epoch) == [math.ceil(n_train / b) for b in t.batch_size]
    assert (t.train_loss_std > 0).all()


def test_ablation_stages_keep_the_file_order(catalogue):
    cfg, key, folder = catalogue("ablation")
    t = table(folder, "ablation_stages")
    order = list(cfg.space["stage"].choices)
    assert len(t) == 3 and list(t.stage) == sorted(t.stage, key=order.index)
    assert list(t.order) == [order.index(s) + 1 for s in t.stage]


def test_train_size_smoke_caps_subsets_and_reports_the_gap(catalogue):
    cfg, key, folder = catalogue("train_size")
    t = table(folder, "train_size_trials")
    assert list(t.n_per_class) == [10, 50]  # 10, 100, 1000 capped at 50 per class: two points
    assert list(t.gap) == pytest.approx(list(t.train_acc - t.test_acc))


# -- trainer additions the views read ---------------------------------------------------------


def test_train_loss_std_is_the_spread_of_the_per_step_losses(digits):
    """Oracle: the same run replayed step by step by hand (same seed, same batches)."""
    cfg = TrainConfig(schedule="constant", lr=0.05, epochs=1, batch_size=400, threads=1)
    metrics = train(cfg, digits).history[0].metrics
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, digits.input_shape, digits.n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    perm = torch.randperm(len(digits.x_train),
                          generator=torch.Generator().manual_seed(cfg.seed))
    losses, sizes = [], []
    for k in range(3):  # 1149 examples in batches of 400: 400, 400, 349
        idx = perm[k * 400:(k + 1) * 400]
        loss = torch.nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sizes.append(len(idx))
    assert metrics["train_loss_std"] == pytest.approx(torch.tensor(losses).std().item(), rel=1e-5)
    mean = sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes)
    assert metrics["train_loss"] == pytest.approx(mean, rel=1e-5)
    assert metrics["epoch_seconds"] > 0


def test_per_epoch_test_metrics_are_opt_in_and_change_no_choice(digits):
    base = TrainConfig(schedule="constant", lr=0.05, epochs=3, threads=1)
    plain = train(base, digits)
    with_test = train(base.model_copy(update={"eval_test_each_epoch": True}), digits)
    assert "epoch_test_acc" not in plain.history[0].metrics
    assert all({"epoch_test_loss", "epoch_test_acc"} <= set(r.metrics)
               for r in with_test.history)
    # The curve's point at the kept epoch is the final test score of the kept model.
    kept = with_test.history[with_test.best_epoch - 1].metrics
    assert kept["epoch_test_acc"] == with_test.test_acc
    assert (with_test.best_epoch, with_test.best_val_acc, with_test.test_acc) == (
        plain.best_epoch, plain.best_val_acc, plain.test_acc)
