"""What a search decides, checked end to end on real studies (real digits training, real journal
and SQLite stores; the CLI in-process, or as two separate processes): a crowded edge flagged on
the fine study and its MLflow run, a trial the median pruner stops (PRUNED, its run KILLED), a
categorical parameter narrowed to the values the parent's best trials used, and the same
``--seed`` giving the same study twice.

Every study runs with one worker (``--workers 1``), so its trials run in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState
from search_fixtures import (
    RUN_STATUS,
    artifact_paths,
    fresh_store,
    load,
    one_torch_thread,
    run_search,
    store_uri,
    study_runs,
    write_study,
)
from test_search import TINY, tiny_study

from pipeline import names
from pipeline.search.objective import trial_seed

assert one_torch_thread  # an autouse fixture, imported to apply to this module


def search(folder: Path, path: Path, *argv: str):
    result = run_search(folder, "--study", str(path), "--workers", "1", *argv)
    assert result.code == 0, result.err
    return result


def study_file(folder: Path, name: str, fixed: dict, free: tuple = (), **top) -> Path:
    """A tiny study file like tiny_study's (TINY's settings but the ``free`` ones, which it or
    its parent searches), with no space unless given: a fine study's is narrowed from its
    ``parent``."""
    body = {"name": name, "sampler": {"name": "random", "seed": 0},
            "fixed": {k: v for k, v in {**TINY, **fixed}.items() if k not in free}, **top}
    return write_study(folder, name, json.dumps(body))  # JSON is YAML


def best_first(study, k: int) -> list:
    """The study's k best complete trials, best first, ties to the earlier (as narrowing ranks)."""
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return sorted(done, key=lambda t: (-t.value, t.number))[:k]


def logged_json(client, run_id: str, path: str, folder: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(folder))).read_text())


# -- a crowded edge is flagged on the fine study and tagged on its run ----------------------------


def test_best_values_crowding_the_top_of_a_range_flag_that_edge_on_the_fine_study_and_run(
        tmp_path, empty_mlflow_db):
    """The parent searches 1 or 2 epochs: a trial trained for 2 learns more than one trained
    for 1, so its best trials sit on the top edge of the range. The fine study's narrowing
    record, its run's narrowing.json and its run's tag ``pipeline.boundary.epochs`` must all
    say "high", and the console warns. (How far the fine range then reaches past the edge is
    narrowing's business, not checked here.)"""
    client = fresh_store(tmp_path, empty_mlflow_db)
    fixed = {"lr": 0.05, "width": 16}
    parent = study_file(tmp_path, "edge", fixed, free=("epochs",), n_trials=8,
                        space={"epochs": {"type": "int", "low": 1, "high": 2}})
    search(tmp_path, parent)
    child = study_file(tmp_path, "edge-fine", fixed, free=("epochs",), parent="edge", n_trials=2,
                       narrow={"top_k": 2, "margin": 0.25, "boundary_fraction": 0.1,
                               "enqueue": 1})
    result = search(tmp_path, child)

    # The premise, from the parent's trials: the best two trained for 2 epochs, some for 1.
    coarse = load(tmp_path, "edge")
    best = best_first(coarse, 2)
    assert [t.params["epochs"] for t in best] == [2, 2]
    assert 1 in {t.params["epochs"] for t in coarse.trials}

    record = load(tmp_path, "edge-fine").user_attrs["narrowing"]
    assert record["trials"] == [t.number for t in best]
    assert record["boundary_flags"] == {"epochs": "high"}
    assert record["params"]["epochs"]["boundary"] == "high"
    (run,) = study_runs(client, "edge-fine")
    tags = {k: v for k, v in run.data.tags.items() if k.startswith(names.BOUNDARY_PREFIX)}
    assert tags == {f"{names.BOUNDARY_PREFIX}epochs": "high"}
    logged = logged_json(client, run.info.run_id, names.NARROWING, tmp_path)
    assert logged["boundary_flags"] == {"epochs": "high"}
    assert logged["params"]["epochs"]["boundary"] == "high"
    assert "epochs's best values crowd the high edge of edge's range" in result.out
    # the parent has no parent: nothing flagged on its run
    (parent_run,) = study_runs(client, "edge")
    assert not any(k.startswith(names.BOUNDARY_PREFIX) for k in parent_run.data.tags)


# -- the median pruner ----------------------------------------------------------------------------


def test_a_trial_the_median_pruner_stops_is_pruned_and_its_run_killed(tmp_path, empty_mlflow_db):
    """Learning rates from 1e-6 (nothing learnt in an epoch) to 0.3 (most learnt), three epochs
    each; the median pruner, after one complete trial and from the first epoch, stops a trial
    whose epoch falls below the median of the complete trials' same epoch."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    epochs = 3
    path = tiny_study(tmp_path, "median", fixed={"epochs": epochs, "width": 16}, n_trials=6,
                      space={"lr": {"type": "float", "low": 1e-6, "high": 0.3, "log": True}},
                      pruner={"name": "median",
                              "options": {"n_startup_trials": 1, "n_warmup_steps": 0}})
    search(tmp_path, path)
    trials = load(tmp_path, "median").trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.state, t.intermediate_values) for t in trials]
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == RUN_STATUS[t.state], (t.number, t.state)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.value for m in history] == pytest.approx(
            [t.intermediate_values[e] for e in sorted(t.intermediate_values)])
        if t.state == TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == list(range(1, epochs + 1))
            assert names.PRUNED not in run.data.tags
            continue
        # Pruned by the median rule (not for diverging), after its last reported epoch ...
        stop = max(t.intermediate_values)
        assert sorted(t.intermediate_values) == list(range(1, stop + 1)) and stop < epochs
        assert t.user_attrs["pruned_reason"] == f"pruned at epoch {stop}"
        assert run.info.status == "KILLED"
        assert run.data.tags[names.PRUNED] == f"pruned at epoch {stop}"
        assert len(history) == stop and "test_acc" not in run.data.metrics
        # ... where it lay below the median of the earlier complete trials at that epoch.
        earlier = sorted(e.intermediate_values[stop] for e in trials[:t.number]
                         if e.state == TrialState.COMPLETE)
        assert earlier, "pruned with no complete trial before it"
        n = len(earlier)
        median = (earlier[(n - 1) // 2] + earlier[n // 2]) / 2
        assert max(t.intermediate_values.values()) < median  # its best epoch so far
    (study_run,) = study_runs(client, "median")
    assert study_run.data.metrics["n_pruned"] == len(pruned)
    assert study_run.data.metrics["n_complete"] == len(trials) - len(pruned)


# -- categorical narrowing ------------------------------------------------------------------------


def test_a_categorical_narrows_to_the_choices_the_best_trials_used_in_parent_order(
        tmp_path, empty_mlflow_db):
    """The parent runs the whole grid of 3 activations x 2 widths; sigmoid learns little in one
    epoch, so its 4 best trials use tanh and relu. The fine study searches exactly the choices
    its parent's best trials used, in the parent's order (not in the order of their values),
    and every fine trial takes one of them."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    choices = ["sigmoid", "relu", "tanh"]
    parent = study_file(tmp_path, "cat", {"lr": 0.1}, free=("width",), n_trials=6,
                        sampler={"name": "grid", "seed": 0}, space={
                            "activation": {"type": "categorical", "choices": choices},
                            "width": {"type": "categorical", "choices": [8, 32]}})
    search(tmp_path, parent)
    child = study_file(tmp_path, "cat-fine", {"lr": 0.1}, free=("width",), parent="cat",
                       n_trials=5, narrow={"top_k": 4, "enqueue": 2})
    search(tmp_path, child)

    coarse = load(tmp_path, "cat")
    assert len({(t.params["activation"], t.params["width"]) for t in coarse.trials}) == 6
    best = best_first(coarse, 4)
    used = [t.params["activation"] for t in best]
    expected = [c for c in choices if c in used]
    # The premise: the best trials left a choice out, and the best of them is not the first
    # of theirs in the parent's order (so the order below is the parent's, not the values').
    assert len(expected) == 2 and used[0] != expected[0], used

    fine = load(tmp_path, "cat-fine")
    record = fine.user_attrs["narrowing"]
    assert record["trials"] == [t.number for t in best]
    assert record["params"]["activation"]["best_values"] == used
    assert record["params"]["activation"]["new"]["choices"] == expected
    assert fine.user_attrs["space"]["activation"] == {"type": "categorical",
                                                      "choices": expected}
    (run,) = study_runs(client, "cat-fine")
    assert {names.SEARCH_SPACE, names.NARROWING} <= artifact_paths(client, run.info.run_id)
    logged = logged_json(client, run.info.run_id, names.SEARCH_SPACE, tmp_path)
    assert logged["activation"]["choices"] == expected
    assert logged_json(client, run.info.run_id, names.NARROWING, tmp_path)["space"][
        "activation"]["choices"] == expected
    # the fine trials: the parent's two best first, then sampled; all inside the choices
    assert len(fine.trials) == 5
    assert [t.params["activation"] for t in fine.trials[:2]] == used[:2]
    assert {t.params["activation"] for t in fine.trials} <= set(expected)
    for t in fine.trials:
        assert t.distributions["activation"].choices == tuple(expected)
        trial_run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert trial_run.data.params["activation"] == t.params["activation"]


# -- the same seed twice, in two processes ---------------------------------------------------------


def test_the_same_seed_in_two_separate_processes_gives_the_same_study(tmp_path, subprocess_env,
                                                                     empty_mlflow_db):
    """``python -m pipeline.search --study X --seed 7`` run twice, at once, each process in a
    folder of its own (its own Optuna journal and MLflow store): the same trials, parameters,
    per-epoch values, pruning decisions and test accuracies. TPE leaves its random start-up
    after two trials, so the model-based suggestions are compared too; the seed overrides the
    study file's (0) and reaches every trial's training seed."""
    seed = 7
    path = tiny_study(tmp_path, "seeded", fixed={"epochs": 2, "width": 16}, n_trials=4,
                      sampler={"name": "tpe", "seed": 0, "options": {"n_startup_trials": 2}},
                      pruner={"name": "median",
                              "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
                      space={"lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
                             "activation": {"type": "categorical",
                                            "choices": ["relu", "tanh"]}})
    folders = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for folder in folders:
        folder.mkdir()
        fresh_store(folder, empty_mlflow_db)  # its schema made already: seconds saved
        env = {**subprocess_env, "MLFLOW_TRACKING_URI": store_uri(folder),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pipeline.search", "--study", str(path), "--seed",
             str(seed), "--workers", "1", "--quiet"],
            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err

    def outcome(folder: Path):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=store_uri(folder))
        study = load(folder, "seeded")
        assert study.user_attrs["seed"] == seed
        (run,) = study_runs(client, "seeded")
        assert run.data.params["study.sampler_seed"] == str(seed)
        rows = []
        for t in study.trials:
            trial_run = client.get_run(t.user_attrs["mlflow_run_id"])
            assert trial_run.data.params["seed"] == str(trial_seed(seed, t.number))
            curve = [m.value for m in client.get_metric_history(trial_run.info.run_id,
                                                                "val_acc")]
            rows.append((t.number, t.state, t.params, t.value, t.intermediate_values,
                         t.user_attrs.get("test_acc"), trial_run.info.status, curve))
        return rows

    first, second = (outcome(folder) for folder in folders)
    assert len(first) == 4
    assert first == second
    assert len({r[2]["lr"] for r in first}) == 4  # four different draws, not one repeated
