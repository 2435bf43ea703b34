"""A study's final run (pipeline.final) and transfer studies (pipeline.transfer), end to end on
digits with real training, a real journal and a real SQLite MLflow store; the transfer report
view on a literal study and on the real one.

- final: the winner of a tiny study is retrained on train + validation, for longer, with
  the test split evaluated exactly once; its run nests under the study's run.
- transfer: a source study (a CNN on digits resized to 16x16) runs first; the transfer study
  finds its winner through MLflow, inherits its architecture and input size, and its
  linear-probe / fine-tune trials start from its weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from search_fixtures import (
    PARENT,
    REPO,
    Outcome,
    all_runs,
    artifact_paths,
    fresh_store,
    load,
    one_torch_thread,
    run_search,
    store_uri,
    study_names,
    study_runs,
    write_study,
)

import pipeline.training.trainer
from pipeline.config import ConfigError, TrainConfig
from pipeline.final import final_config
from pipeline.report.extract import StudyData
from pipeline.report.views import registry as report_views
from pipeline.report.views.transfer import contrast_examples, transfer_info
from pipeline.search.processes import usable_cores
from pipeline.search.studyfile import load_study
from pipeline.search.transfer import inherited
from pipeline.search.winner import NoWinner, find_winner
from pipeline.training.data import load_splits
from pipeline.training.models import build_model

assert one_torch_thread  # an autouse fixture, imported to apply to this module
PNG = b"\x89PNG\r\n\x1a\n"

# -- final ------------------------------------------------------------------------------------

TINY = """\
name: tiny
dataset: digits
sampler: {name: random, seed: 0}
n_trials: 2
fixed: {threads: 1, schedule: cyclical, step_size_epochs: 1, cycles: 1, batch_size: 64,
        eta_min: 1.0e-3, eta_max: 0.2, depth: 1, seed: 3}
space:
  width: {type: int, low: 8, high: 24}
"""


def run_final(folder, *argv: str) -> Outcome:
    """``python -m pipeline.final ARGV`` in-process, with cwd and MLflow store in ``folder``."""
    from pipeline.final import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", store_uri(folder))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    return Outcome(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def final(tmp_path_factory, empty_mlflow_db):
    """The tiny study, then its final run, counting every evaluation."""
    folder = tmp_path_factory.mktemp("final")
    client = fresh_store(folder, empty_mlflow_db)
    path = write_study(folder, "tiny", TINY)
    before_study = run_final(folder, "--study", str(path), "--smoke")  # nothing to retrain yet
    runs_before = len(all_runs(client))
    searched = run_search(folder, "--study", str(path))
    assert searched.code == 0, searched.err
    evaluated = []
    real = pipeline.training.trainer.evaluate

    def counting(model, x, y, *batch):
        evaluated.append(len(y))
        return real(model, x, y, *batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.training.trainer, "evaluate", counting)
        done = run_final(folder, "--study", str(path), "--length-factor", "3")
    assert done.code == 0, done.err
    (run,) = [r for r in all_runs(client) if r.data.tags.get("pipeline.kind") == "final"]
    return folder, client, path, before_study, runs_before, done, run, evaluated


def test_final_before_the_study_ran_is_refused_and_creates_nothing(final):
    folder, client, path, before_study, runs_before, *_ = final
    assert before_study.code == 2
    # --smoke: the winner of the study's smoke run (named NAME-smoke, as search names it)
    assert "study 'tiny-smoke' has no finished run" in before_study.err
    assert f"Run it first: python -m pipeline.search --study {path} --smoke" in before_study.err
    assert runs_before == 0


def test_final_retrains_the_winner_on_train_plus_val_for_longer(final):
    folder, client, path, _, _, done, run, _ = final
    (study_run,) = study_runs(client, "tiny")
    best = int(study_run.data.metrics["best_trial"])
    trial = load(folder, "tiny").trials[best]
    trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
    # nested under the study's run, and says which trial it retrains
    assert run.info.run_name == "tiny-final" and run.info.status == "FINISHED"
    assert run.data.tags[PARENT] == study_run.info.run_id
    assert run.data.tags["pipeline.study"] == "tiny"
    assert run.data.tags["pipeline.final_trial_run"] == trial_run.info.run_id
    assert run.data.params["final.trial_number"] == str(best)
    # the trial's exact configuration, but on train+val, three times the cycles and every core
    differs = {k for k, v in trial_run.data.params.items()
               if k in run.data.params and run.data.params[k] != v}
    assert differs == {"train_on", "cycles"} | ({"threads"} if usable_cores() > 1 else set())
    assert run.data.params["threads"] == str(usable_cores())
    assert run.data.params["train_on"] == "train+val"
    assert int(run.data.params["cycles"]) == 3 * int(trial_run.data.params["cycles"])
    splits = load_splits("digits")
    assert run.data.metrics["n_train"] == len(splits.y_train) + len(splits.y_val)
    assert run.data.metrics["n_test"] == len(splits.y_test)
    epochs = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(epochs) == 2 * 1 * 3  # 2 * step_size_epochs * cycles
    assert client.get_metric_history(run.info.run_id, "val_acc") == []  # nothing held out
    assert f"test acc {run.data.metrics['test_acc']:.4f}, measured once" in done.out


def test_final_evaluates_the_test_split_once_with_the_last_epoch_weights(final):
    folder, client, _, _, _, _, run, evaluated = final
    splits = load_splits("digits")
    assert evaluated == [len(splits.y_test)]  # one evaluation, and no validation ones
    files = artifact_paths(client, run.info.run_id)
    assert {"model/state_dict.pt", "misclassified.png", "correct.png", "learning_curves.png",
            "test_predictions.npy", "examples.npz", "config.json"} <= files
    with open(client.download_artifacts(run.info.run_id, "config.json", str(folder))) as fh:
        cfg = TrainConfig(**json.load(fh))
    model = build_model(cfg, splits.input_shape, splits.n_classes)
    model.load_state_dict(torch.load(client.download_artifacts(
        run.info.run_id, "model/state_dict.pt", str(folder)), weights_only=True))
    _, acc, pred = pipeline.training.trainer.evaluate(model, splits.x_test, splits.y_test)
    assert acc == run.data.metrics["test_acc"]  # the logged weights are the model tested
    logged = np.load(client.download_artifacts(run.info.run_id, "test_predictions.npy",
                                               str(folder)))
    assert np.array_equal(logged, pred.numpy())


def test_final_config_multiplies_cycles_or_epochs():
    cyclical = final_config({"schedule": "cyclical", "cycles": 2, "step_size_epochs": 3,
                             "threads": 1}, 2, threads=4)
    assert (cyclical.cycles, cyclical.n_epochs, cyclical.train_on) == (4, 24, "train+val")
    assert cyclical.threads == 4  # one run: every core, not the trial's share
    constant = final_config({"schedule": "constant", "epochs": 7, "cycles": 2}, 3, threads=1)
    assert (constant.epochs, constant.cycles) == (21, 2)


def test_mlflow_run_final_entry_point(final, tmp_path):
    """`mlflow run . -e final` (the MLproject entry point): the run it makes is the final run,
    nested under the study's run."""
    folder, client, path, *_ = final
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "conda.yaml", "pyproject.toml", "pipeline", "studies"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, project / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": store_uri(folder), "OMP_NUM_THREADS": "1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(project), "-e", "final", "--env-manager",
         "local", "-P", f"study={path}", "-P", "length_factor=2"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [r for r in all_runs(client) if r.data.tags.get("mlflow.project.entryPoint")
              == "final"]
    (study_run,) = study_runs(client, "tiny")
    assert run.info.run_name == "tiny-final" and run.info.status == "FINISHED"
    assert run.data.tags["pipeline.kind"] == "final"
    assert run.data.tags[PARENT] == study_run.info.run_id
    assert run.data.params["length_factor"] == "2"  # the entry point's own parameter
    assert run.data.params["train_on"] == "train+val" and "test_acc" in run.data.metrics


# -- transfer -----------------------------------------------------------------------------------

SOURCE = """\
name: src
dataset: digits
sampler: {name: grid, seed: 0}
n_trials: 2
fixed: {threads: 1, arch: cnn, conv_blocks: 1, channels: 4, depth: 1, width: 16,
        batch_norm: true, resize: 16, optimizer: momentum, schedule: constant, epochs: 2,
        batch_size: 64, seed: 0}
space:
  lr: {type: categorical, choices: [0.05, 0.01]}
"""

TARGET = """\
name: tgt
dataset: digits
source: src
sampler: {name: grid, seed: 0}
n_trials: 6
fixed: {threads: 1, optimizer: momentum, schedule: constant, epochs: 2, batch_size: 64, seed: 1}
space:
  transfer: {type: categorical, choices: [scratch, linear_probe, fine_tune]}
  lr: {type: categorical, choices: [0.003, 0.03]}
report: {views: [transfer]}
"""


@pytest.fixture(scope="module")
def transfer(tmp_path_factory, empty_mlflow_db):
    """The transfer study before its source ran (refused), then the source, then the study."""
    folder = tmp_path_factory.mktemp("transfer")
    client = fresh_store(folder, empty_mlflow_db)
    src, tgt = write_study(folder, "src", SOURCE), write_study(folder, "tgt", TARGET)
    early = run_search(folder, "--study", str(tgt))
    early_state = (study_names(folder), len(all_runs(client)))
    assert run_search(folder, "--study", str(src)).code == 0
    done = run_search(folder, "--study", str(tgt))
    assert done.code == 0, done.err
    winner = find_winner(client, "src", "-")
    trials = {t.number: client.get_run(t.user_attrs["mlflow_run_id"])
              for t in load(folder, "tgt").trials}
    return folder, client, early, early_state, winner, trials


def weights(client, run_id: str, folder) -> dict[str, torch.Tensor]:
    return torch.load(client.download_artifacts(run_id, "model/state_dict.pt", str(folder)),
                      weights_only=True)


def test_transfer_before_its_source_ran_is_refused_and_creates_nothing(transfer):
    folder, client, early, (names, n_runs), *_ = transfer
    assert early.code == 2
    assert "'src'" in early.err and "python -m pipeline.search --study src" in early.err
    assert names == [] and n_runs == 0


def test_transfer_trials_inherit_the_source_network_and_start_from_its_weights(transfer):
    folder, client, _, _, winner, trials = transfer
    (study_run,) = study_runs(client, "tgt")
    assert study_run.data.tags["pipeline.source_study"] == "src"
    assert study_run.data.tags["pipeline.source_run"] == winner.trial_run_id
    modes = ("scratch", "linear_probe", "fine_tune")
    assert sorted((r.data.params["transfer"], r.data.params["lr"]) for r in trials.values()) == \
        sorted((m, lr) for m in modes for lr in ("0.003", "0.03"))
    for run in trials.values():
        p = run.data.params
        assert run.info.status == "FINISHED"
        for name in ("arch", "conv_blocks", "channels", "depth", "width", "batch_norm"):
            assert p[name] == str(winner.config[name])  # the source's network, not the default
        assert p["resize"] == "16"  # the source's input size: digits resized to 16x16
        if p["transfer"] == "scratch":
            assert p["pretrained"] == "None"
        else:  # the source winner's own weights file, cached locally under its run id
            assert p["pretrained"].endswith(f"{winner.trial_run_id}.pt")


def test_linear_probe_keeps_the_source_features_and_fine_tune_starts_from_them(transfer):
    folder, client, _, _, winner, trials = transfer
    source = weights(client, winner.trial_run_id, folder)
    by_mode = {}
    for run in trials.values():
        if run.data.params["lr"] == "0.03":
            by_mode[run.data.params["transfer"]] = weights(client, run.info.run_id, folder)
    probe, tuned, scratch = by_mode["linear_probe"], by_mode["fine_tune"], by_mode["scratch"]
    features = [k for k in source if not k.startswith("out.")]
    assert features and any("bn" in k for k in features)
    for k in features:  # weights, biases and batch-norm statistics, all unchanged
        assert torch.equal(probe[k], source[k]), k
    assert not torch.equal(probe["out.weight"], source["out.weight"])
    # fine-tuning moved the features, but from the source's: they stay nearer to them than a
    # network trained from scratch with the same rate does
    assert not torch.equal(tuned["conv1.weight"], source["conv1.weight"])
    for k in ("conv1.weight", "fc1.weight"):
        assert (tuned[k] - source[k]).norm() < (scratch[k] - source[k]).norm() / 2, k


def test_transfer_report_view_names_best_and_worst_and_shows_what_separates_them(transfer):
    """The view as the report builds it, from the store (the standard figures are left out:
    tests/test_report.py draws those)."""
    from pipeline.report.extract import extract_study

    folder, client, _, _, _, trials = transfer
    data = extract_study(client, "tgt")
    report_views.load_views(client, data)
    assert data.views == ["transfer"]
    (section,) = report_views.view_sections(data)
    tables = dict(section.tables)
    setups = tables["transfer_setups"]
    assert len(setups) == 6 and list(setups.columns) == ["number", "transfer", "lr", "val_acc",
                                                        "test_acc"]
    best, worst = setups.iloc[0], setups.iloc[-1]
    assert best.val_acc == setups.val_acc.max() and worst.val_acc == setups.val_acc.min()
    for row in (best, worst):
        run = trials[int(row.number)]
        assert row.val_acc == pytest.approx(run.data.metrics["objective"])
        assert row.test_acc == pytest.approx(run.data.metrics["test_acc"])
    assert f"Best setup: transfer={best.transfer}, lr={best.lr:g}" in section.text
    assert f"worst: transfer={worst.transfer}, lr={worst.lr:g}" in section.text
    assert [(name, png[:8]) for name, _, png in section.figures] == [
        ("transfer_by_lr.png", PNG), ("transfer_examples.png", PNG)]
    shown = tables["transfer_best_right_worst_wrong"]
    y = load_splits("digits").y_test.numpy()
    preds = {n: np.load(client.download_artifacts(trials[n].info.run_id, "test_predictions.npy",
                                                  str(folder / str(n))))
             for n in (int(best.number), int(worst.number))}
    assert len(shown) > 0
    for row in shown.itertuples():  # the same test image: the best right, the worst wrong
        i = row.test_index
        assert row.true == y[i] == preds[int(best.number)][i] == row.best_pred
        assert preds[int(worst.number)][i] == row.worst_pred != row.true


# -- pure parts -----------------------------------------------------------------------------------


def test_merge_val_trains_on_exactly_train_plus_val_and_leaves_test_alone():
    plain, merged = load_splits("digits"), load_splits("digits", merge_val=True)
    assert len(merged.y_val) == 0 and merged.x_val.shape[1:] == plain.x_val.shape[1:]
    assert len(merged.y_train) == len(plain.y_train) + len(plain.y_val)
    assert torch.equal(torch.bincount(merged.y_train),
                       torch.bincount(plain.y_train) + torch.bincount(plain.y_val))
    assert torch.equal(merged.y_test, plain.y_test)
    # normalised with the statistics of what it trains on: train+val
    assert float(merged.x_train.mean()) == pytest.approx(0.0, abs=1e-5)


def test_resize_changes_the_image_size_and_nothing_else():
    plain, big = load_splits("digits"), load_splits("digits", resize=16)
    assert big.input_shape == (1, 16, 16)
    assert torch.equal(big.y_train, plain.y_train) and torch.equal(big.y_test, plain.y_test)
    # bilinear: the average of each 2x2 block of the upsampled image tracks the original pixel
    down = torch.nn.functional.avg_pool2d(big.x_test, 2).flatten()
    assert np.corrcoef(down.numpy(), plain.x_test.flatten().numpy())[0, 1] > 0.9


def test_inherited_takes_architecture_and_input_size_only():
    cfg = {"arch": "cnn", "depth": 1, "width": 64, "channels": 16, "conv_blocks": 2,
           "batch_norm": True, "activation": "relu", "lr": 0.1, "dataset": "fashion-mnist",
           "seed": 4, "resize": None}
    assert inherited(cfg, (1, 28, 28)) == {
        "arch": "cnn", "depth": 1, "width": 64, "channels": 16, "conv_blocks": 2,
        "batch_norm": True, "activation": "relu", "resize": 28}


def test_contrast_examples_keeps_the_worst_mistakes_the_best_gets_right():
    worst = {"examples.npz": {"wrong_index": np.array([2, 5, 7]), "wrong_true": np.array([1, 0, 3]),
                              "wrong_pred": np.array([4, 4, 4]),
                              "wrong_images": np.arange(3 * 4).reshape(3, 1, 2, 2),
                              "classes": np.array(["a", "b", "c", "d", "e"])}}
    best = {"test_predictions.npy": np.array([0, 0, 1, 0, 0, 2, 0, 3])}
    ex = contrast_examples(best, worst)
    assert ex["index"].tolist() == [2, 7]  # position 5: the best got it wrong too
    assert ex["true"].tolist() == [1, 3] and ex["worst_pred"].tolist() == [4, 4]
    assert ex["images"][:, 0, 0, 0].tolist() == [0, 8]
    assert contrast_examples({}, worst)["index"].size == 0


def test_transfer_view_on_a_literal_study():
    rows = [(0, "scratch", 0.01, 0.90, 0.89), (1, "linear_probe", 0.01, 0.80, 0.82),
            (2, "fine_tune", 0.01, 0.95, 0.94), (3, "fine_tune", 0.1, 0.93, 0.96)]
    trials = pd.DataFrame([{"number": n, "state": "complete", "transfer": m, "lr": lr,
                            "objective": v, "test_acc": t, "run_id": f"r{n}"}
                           for n, m, lr, v, t in rows])
    space = {"transfer": {"type": "categorical", "choices": ["scratch", "linear_probe",
                                                             "fine_tune"]},
             "lr": {"type": "categorical", "choices": [0.01, 0.1]}}
    data = StudyData("t", "run", {}, {}, trials, list(space), space, None, "val_acc", "maximize")
    info = transfer_info(data)
    assert info.tables["setups"].number.tolist() == [2, 3, 0, 1]
    assert "Best setup: transfer=fine_tune, lr=0.01 (trial 2, validation 0.9500, test 0.9400)" \
        in info.text
    assert "worst: transfer=linear_probe, lr=0.01 (trial 1" in info.text
    assert "scratch 0.9000, linear_probe 0.8000, fine_tune 0.9500" in info.text
    assert info.tables["best_right_worst_wrong"].empty  # no files: nothing to show, no crash
    assert [stem for stem, _, _ in report_views.VIEWS["transfer"].render(info)] == \
        ["by_lr", "examples"]


@pytest.mark.parametrize("body, expected", [
    ("space: {transfer: {type: categorical, choices: [scratch, fine_tune]}}",
     "transfer: fine_tune start from a checkpoint: name the study that trains it as `source`"),
    ("source: nowhere\nfixed: {transfer: scratch}", "source: no study file"),
    ("source: coarse\nfixed: {transfer: scratch, width: 8, resize: 28}",
     "fixed.width: taken from the source study's best trial; remove it"),
    ("source: coarse\nspace: {lr: {type: float, low: 0.01, high: 0.1}}",
     "source: set `transfer`"),
])
def test_bad_transfer_study_files_are_refused(tmp_path, body, expected):
    (tmp_path / "coarse.yaml").write_text("name: coarse\n")
    path = write_study(tmp_path, "bad", f"name: bad\n{body}\n")
    with pytest.raises(ConfigError) as err:
        load_study(str(path))
    assert expected in str(err.value)


def test_a_forged_best_trial_tag_is_never_followed(mlflow_store):
    """Weights are loaded only from a run the pipeline wrote as that study's trial."""
    exp = mlflow_store.get_experiment_by_name("Default").experiment_id
    stranger = mlflow_store.create_run(exp, run_name="not-a-trial").info.run_id
    run = mlflow_store.create_run(exp, run_name="s", tags={
        "pipeline.kind": "study", "pipeline.study": "s", "pipeline.best_trial_run": stranger})
    mlflow_store.log_metric(run.info.run_id, "best_trial", 0)
    mlflow_store.set_terminated(run.info.run_id, "FINISHED")
    with pytest.raises(NoWinner, match="Run it first: how"):
        find_winner(mlflow_store, "s", "how")
