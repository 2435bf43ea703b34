"""Running studies end to end (in-process, real digits training, real journal and SQLite stores):
every shipped study in smoke mode, trial states mirrored on runs, resume, stale trials left by a
killed process, and several worker processes sharing one study."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from optuna.trial import TrialState
from search_fixtures import (
    PARENT,
    RUN_STATUS,
    STUDIES,
    all_runs,
    artifact_paths,
    children,
    fresh_store,
    load,
    one_torch_thread,
    run_report,
    run_search,
    store_uri,
    study_names,
    study_runs,
    write_study,
)

from pipeline.search.plan import study_flags, study_key
from pipeline.search.studyfile import load_study, smoke_config

assert one_torch_thread  # an autouse fixture, imported to apply to this module

# A study that trains in a fraction of a second: fixed settings keep every trial tiny.
TINY = {"schedule": "constant", "epochs": 1, "batch_size": 64}


def tiny_study(folder, name, fixed=None, space=None, **top):
    fixed = {**TINY, **(fixed or {})}
    space = space or {"width": {"type": "int", "low": 8, "high": 16}}
    body = {"name": name, "sampler": {"name": "random", "seed": 0}, "fixed": fixed,
            "space": space, **top}
    return write_study(folder, name, json.dumps(body))  # JSON is YAML


# -- smoke mode: every shipped study file runs ----------------------------------------------------


# Study files with report views run in test_catalogue instead, with these checks and a report.
WITHOUT_VIEWS = [p for p in sorted(STUDIES.glob("*.yaml")) if not load_study(p.stem).report.views]


@pytest.mark.parametrize("path", WITHOUT_VIEWS, ids=lambda p: p.stem)
def test_every_shipped_study_runs_in_smoke_mode(path, tmp_path, empty_mlflow_db):
    """On digits, whatever the file's dataset: the suite runs offline (Fashion-MNIST is a
    Debian package the tests do not rely on)."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    result = run_search(tmp_path, "--study", path.stem, "--smoke", "--dataset", "digits")
    assert result.code == 0, result.err
    chain, todo = [], [load_study(path.stem)]
    while todo:  # smoke mode runs parents and sources first, in smoke mode too, on digits
        cfg = todo.pop()
        chain.append(cfg)
        todo += [load_study(name) for name in (cfg.parent, cfg.source) if name]
    keys = [study_key(cfg.name, cfg.dataset, "digits", smoke=True) for cfg in chain]
    # 3 trials, fewer for a smaller grid or a one-trial study
    smoked = [smoke_config(cfg.model_copy(update={"dataset": "digits"})) for cfg in chain]
    sizes = [cfg.n_trials for cfg in smoked]
    rechecks = [f"{key}-recheck" for key, cfg in zip(keys, smoked) if cfg.recheck]
    assert study_names(tmp_path) == sorted(keys + rechecks)
    for key, size, cfg in zip(keys, sizes, smoked):
        study = load(tmp_path, key)
        assert len(study.trials) == size
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
        (run,) = study_runs(client, key)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == key
        nested = children(client, run.info.run_id)
        kinds = [r.data.tags["pipeline.kind"] for r in nested]
        assert kinds.count("trial") == size
        complete = sum(t.state == TrialState.COMPLETE for t in study.trials)
        rechecked = min(cfg.recheck.top_k, complete) * cfg.recheck.seeds if cfg.recheck else 0
        assert kinds.count("recheck") == rechecked and len(nested) == size + rechecked
        if rechecked:  # the re-check named a winner among the trials
            assert int(run.data.tags["pipeline.winner_trial"]) in range(size)
        # one cycle of one-epoch half-cycles: two epochs per trial
        assert all(max(t.intermediate_values) <= 2 for t in study.trials)
    assert not any(r.info.status == "RUNNING" for r in all_runs(client))
    assert re.search(rf"\[{keys[0]}\] \d complete, \d pruned, 0 failed "
                     rf"\(of {sizes[0]} requested\)", result.out), result.out
    if smoked[0].recheck:  # the hint names this very run: its dataset and smoke flags too
        flags = " --dataset digits" if chain[0].dataset != "digits" else ""
        assert (f"retrain the winner: python -m pipeline.final --study {path.stem}{flags} "
                "--smoke\n") in result.out, result.out


@pytest.mark.parametrize("name, file_dataset, dataset, smoke", [
    ("coarse", "digits", "digits", False), ("coarse", "digits", "digits", True),
    ("coarse", "digits", "fashion-mnist", False), ("fashion_fine", "fashion-mnist", "digits", True),
    ("fashion_fine", "fashion-mnist", "fashion-mnist", True)])
def test_study_flags_name_the_study_key_they_come_from(name, file_dataset, dataset, smoke):
    flags = study_flags(study_key(name, file_dataset, dataset, smoke), dataset).split()
    assert flags[:2] == ["--study", name]
    assert ("--smoke" in flags) == smoke
    assert (flags[flags.index("--dataset") + 1] if "--dataset" in flags else file_dataset) \
        == dataset


# -- trial states on runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failing(tmp_path_factory, empty_mlflow_db):
    """A study whose fixed settings make every trial raise at run time (missing checkpoint)."""
    folder = tmp_path_factory.mktemp("failing")
    client = fresh_store(folder, empty_mlflow_db)
    path = tiny_study(folder, "failing", fixed={"pretrained": "/nonexistent.pt",
                                                "freeze": "features"}, n_trials=3)
    return folder, client, run_search(folder, "--study", str(path))


def test_failing_trials_are_fail_with_failed_runs_and_error_txt(failing):
    folder, client, result = failing
    study = load(folder, "failing")
    assert study.trials and all(t.state == TrialState.FAIL for t in study.trials)
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert "error.txt" in artifact_paths(client, run.info.run_id)
        text = open(client.download_artifacts(run.info.run_id, "error.txt")).read()
        assert "FileNotFoundError" in text and "/nonexistent.pt" in text
        assert "FileNotFoundError" in t.user_attrs["error"]


def test_study_stops_after_five_failures_in_a_row(failing):
    folder, client, result = failing
    study = load(folder, "failing")
    # failed trials do not count towards n_trials (3), so the stop rule is what ends it
    assert len(study.trials) == 5
    assert "stopping: 5 trials in a row failed" in result.out
    assert "FileNotFoundError" in result.out
    (run,) = study_runs(client, "failing")
    assert run.data.metrics["n_failed"] == 5 and run.data.metrics["n_complete"] == 0
    assert "pipeline.best_model_uri" not in run.data.tags
    # A study that keeps failing is a failed execution: non-zero exit, FAILED study run.
    assert result.code == 1
    assert run.info.status == "FAILED"
    assert "failed: see the failed trials' error.txt" in result.err


def test_diverged_trials_are_pruned_and_their_runs_killed(tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    # lr * 2 * lambda = 200: the weights overflow within the first epoch
    path = tiny_study(tmp_path, "diverging", fixed={"lr": 10.0, "l2_lambda": 10.0, "epochs": 3},
                      n_trials=2)
    result = run_search(tmp_path, "--study", str(path))
    assert result.code == 0, result.err
    study = load(tmp_path, "diverging")
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        assert "diverged" in run.data.tags["pipeline.pruned"]
        assert "diverged" in t.user_attrs["pruned_reason"]
    (run,) = study_runs(client, "diverging")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_pruned"] == 2


def test_a_grid_study_runs_its_whole_grid(tmp_path, empty_mlflow_db):
    """`grid` is an accepted sampler. Optuna's GridSampler calls study.stop() once the grid is
    used up, which raises outside study.optimize."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    path = tiny_study(tmp_path, "grid", sampler={"name": "grid", "seed": 0}, n_trials=2,
                      space={"width": {"type": "categorical", "choices": [8, 16]}})
    result = run_search(tmp_path, "--study", str(path))
    assert result.code == 0, result.err
    study = load(tmp_path, "grid")
    assert sorted(t.params["width"] for t in study.trials) == [8, 16]
    (run,) = study_runs(client, "grid")
    assert run.info.status == "FINISHED"


def test_a_parent_whose_name_differs_from_its_file_name_still_narrows(tmp_path, empty_mlflow_db):
    """`parent:` names a study file; the parent's Optuna study is named after its `name` key."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    studies = tmp_path / "studies"
    studies.mkdir()
    space = {"l2_lambda": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}}
    tiny_study(studies, "a", space=space, n_trials=2)
    (studies / "a.yaml").write_text((studies / "a.yaml").read_text()
                                    .replace('"name": "a"', '"name": "alpha"'))
    tiny_study(studies, "b", parent="a", n_trials=1)
    assert run_search(tmp_path, "--study", str(studies / "a.yaml")).code == 0
    result = run_search(tmp_path, "--study", str(studies / "b.yaml"))
    assert result.code == 0, result.err
    assert load(tmp_path, "b").user_attrs["narrowing"]["parent"] == "alpha"
    assert study_runs(client, "b")[0].info.status == "FINISHED"


def _chain(folder):
    """Three study files: alpha (its own space), then beta narrowed from alpha and gamma
    narrowed from beta (neither names a space of its own: each searches its parent's, narrowed)."""
    studies = folder / "studies"
    studies.mkdir()
    space = {"l2_lambda": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
             "width": {"type": "int", "low": 8, "high": 64, "log": True}}
    narrow = {"top_k": 2, "margin": 0.1, "enqueue": 1}
    for name, parent, n in (("alpha", None, 4), ("beta", "alpha", 3), ("gamma", "beta", 2)):
        body = {"name": name, "sampler": {"name": "random", "seed": 0}, "fixed": TINY,
                "n_trials": n, **({"parent": parent, "narrow": narrow} if parent
                                  else {"space": space})}
        write_study(studies, name, json.dumps(body))
    return studies


def _inside(study, parent) -> bool:
    """The study's space lies in its parent's, but for the edges its narrowing record says were
    widened past the parent's (a crowded edge), which lie exactly where the record says."""
    inner, outer = study.user_attrs["space"], parent.user_attrs["space"]
    for name, rec in study.user_attrs["narrowing"]["params"].items():
        widened = {side: e["new"] for side, e in rec["edges"].items()
                   if e["change"].startswith("widened")}
        if not inner[name]["low"] < inner[name]["high"]:
            return False
        for side, past in (("low", lambda a, b: a < b), ("high", lambda a, b: a > b)):
            edge, parent_edge = inner[name][side], outer[name][side]
            if side in widened:
                ok = edge == widened[side] and past(edge, parent_edge)
            else:
                ok = not past(edge, parent_edge)
            if not ok:
                return False
    return set(inner) == set(outer)


def test_a_third_study_narrows_from_the_fine_one(tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    studies = _chain(tmp_path)
    early = run_search(tmp_path, "--study", str(studies / "gamma.yaml"))
    assert early.code == 2  # and the hint names the parent's file, beside gamma's
    assert f"Run it first: python -m pipeline.search --study {studies / 'beta.yaml'}\n" in early.err
    for name in ("alpha", "beta", "gamma"):
        result = run_search(tmp_path, "--study", str(studies / f"{name}.yaml"))
        assert result.code == 0, result.err
    alpha, beta, gamma = (load(tmp_path, k) for k in ("alpha", "beta", "gamma"))
    assert gamma.user_attrs["narrowing"]["parent"] == "beta"
    assert beta.user_attrs["narrowing"]["parent"] == "alpha"
    assert _inside(gamma, beta)
    assert _inside(beta, alpha)
    # the trials gamma narrowed from are beta's best, and its first trial is the best of them
    best = max((t for t in beta.trials if t.state == TrialState.COMPLETE),
               key=lambda t: (t.value, -t.number))
    assert gamma.user_attrs["narrowing"]["trials"][0] == best.number
    assert gamma.trials[0].params == best.params
    assert len(gamma.trials) == 2
    (run,) = study_runs(client, "gamma")
    assert run.data.tags["pipeline.parent_study"] == "beta"
    assert run.info.status == "FINISHED"


def test_smoke_mode_runs_a_chain_of_parents_first(tmp_path, empty_mlflow_db):
    fresh_store(tmp_path, empty_mlflow_db)
    studies = _chain(tmp_path)
    result = run_search(tmp_path, "--study", str(studies / "gamma.yaml"), "--smoke")
    assert result.code == 0, result.err
    assert study_names(tmp_path) == ["alpha-smoke", "beta-smoke", "gamma-smoke"]
    assert load(tmp_path, "gamma-smoke").user_attrs["narrowing"]["parent"] == "beta-smoke"
    assert load(tmp_path, "beta-smoke").user_attrs["narrowing"]["parent"] == "alpha-smoke"
    # gamma finds no parent and runs beta, which finds none and runs alpha
    assert result.out.index("parent beta-smoke") < result.out.index("parent alpha-smoke")


def test_a_crowded_edge_widens_past_the_parent_and_the_record_and_report_say_so(
        tmp_path, empty_mlflow_db):
    """alpha searches width in 8..9 and depth in 1..2: beta's one best trial of alpha lies on an
    edge of each, so both are flagged. width goes past its edge by the padding (margin 1 x a
    tenth of the range, rounded outward: one step); depth would too, but beta's limits stop it
    at alpha's edge. The record on the Optuna study and the MLflow run, the console and the
    report's narrowing table all say so, with the old and the new edge."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    studies = tmp_path / "studies"
    studies.mkdir()
    space = {"width": {"type": "int", "low": 8, "high": 9},
             "depth": {"type": "int", "low": 1, "high": 2}}
    common = {"sampler": {"name": "random", "seed": 0}, "fixed": TINY}
    write_study(studies, "alpha", json.dumps({"name": "alpha", **common, "n_trials": 3,
                                              "space": space}))
    write_study(studies, "beta", json.dumps({
        "name": "beta", **common, "n_trials": 1, "parent": "alpha",
        "narrow": {"top_k": 1, "margin": 1.0, "enqueue": 1},
        "limits": {"depth": {"low": 1, "high": 2}}}))
    assert run_search(tmp_path, "--study", str(studies / "alpha.yaml")).code == 0
    result = run_search(tmp_path, "--study", str(studies / "beta.yaml"))
    assert result.code == 0, result.err

    alpha, beta = load(tmp_path, "alpha"), load(tmp_path, "beta")
    record = beta.user_attrs["narrowing"]
    best = alpha.trials[record["trials"][0]].params
    side = "high" if best["width"] == 9 else "low"
    old, new = (9, 10) if side == "high" else (8, 7)
    depth_side = "high" if best["depth"] == 2 else "low"
    assert record["boundary_flags"] == {"width": side, "depth": depth_side}
    assert record["params"]["width"]["edges"] == {
        side: {"change": "widened", "old": old, "new": new}}
    assert record["params"]["depth"]["edges"] == {depth_side: {
        "change": "clipped at limit", "old": best["depth"], "new": best["depth"],
        "limit": best["depth"]}}
    assert beta.user_attrs["space"]["width"][side] == new
    assert beta.user_attrs["space"]["depth"] == {**space["depth"], "log": False, "step": 1}
    assert beta.trials[0].params == best  # seeded with alpha's best, inside the new space
    assert _inside(beta, alpha) and record["limits"]["depth"] == {"low": 1, "high": 2}
    assert (f"width's best values crowd the {side} edge of alpha's range; the optimum may lie "
            f"outside it: {side} {old} → {new} (widened)") in result.out

    (run,) = study_runs(client, "beta")
    logged = json.loads((Path(client.download_artifacts(run.info.run_id, "narrowing.json",
                                                        str(tmp_path)))).read_text())
    assert logged["params"] == record["params"]
    result = run_report(tmp_path, "--study", "beta", "--no-log")
    code, printed = result.code, result.out + result.err
    assert code == 0, printed
    report = (tmp_path / "reports" / "beta" / "report.md").read_text()
    assert f"{side} {old} → {new} (widened)" in report
    assert f"{depth_side} {best['depth']} (clipped at limit)" in report


# -- resume ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, empty_mlflow_db):
    folder = tmp_path_factory.mktemp("resume")
    client = fresh_store(folder, empty_mlflow_db)
    first = run_search(folder, "--study", "coarse", "--n-trials", "3")
    after_first = [(t.number, t.params) for t in load(folder, "coarse").trials]
    second = run_search(folder, "--study", "coarse", "--n-trials", "5")
    return folder, client, first, second, after_first


def test_rerun_tops_the_study_up_to_n_trials_in_total(resumed):
    folder, client, first, second, after_first = resumed
    assert first.code == 0 and second.code == 0, first.err + second.err
    trials = load(folder, "coarse").trials
    assert len(trials) == 5  # not 3 + 5
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert [(t.number, t.params) for t in trials[:3]] == after_first  # kept, not redone
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert study_names(folder) == ["coarse"]


def test_each_execution_is_its_own_study_run_with_its_trials_under_it(resumed):
    folder, client, *_ = resumed
    runs = sorted(study_runs(client, "coarse"), key=lambda r: r.info.start_time)
    assert len(runs) == 2
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.params["study.n_trials"] for r in runs] == ["3", "5"]
    trials = load(folder, "coarse").trials
    owner = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]).data.tags[PARENT]
             for t in trials}
    assert owner == {0: runs[0].info.run_id, 1: runs[0].info.run_id, 2: runs[0].info.run_id,
                     3: runs[1].info.run_id, 4: runs[1].info.run_id}
    assert runs[1].data.metrics["n_complete"] + runs[1].data.metrics["n_pruned"] == 5
    assert load(folder, "coarse").user_attrs["mlflow_run_id"] == runs[1].info.run_id
    assert len(all_runs(client)) == 2 + 5


# -- stale trials left by a killed process --------------------------------------------------------


def test_a_killed_process_leaves_trial_and_runs_that_the_next_run_fails_and_kills(
        tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    path = tiny_study(tmp_path, "stale", n_trials=1)
    assert run_search(tmp_path, "--study", str(path)).code == 0
    # What a process killed mid-trial leaves: its study run and trial run RUNNING, its trial
    # RUNNING in the journal, pointing at the run.
    study = load(tmp_path, "stale")
    dead_study_run = client.create_run("0", run_name="stale", tags={
        "pipeline.kind": "study", "pipeline.study": "stale"}).info.run_id
    dead_trial_run = client.create_run("0", run_name="stale-001", tags={
        PARENT: dead_study_run, "pipeline.kind": "trial"}).info.run_id
    trial = study.ask()
    trial.set_user_attr("mlflow_run_id", dead_trial_run)

    result = run_search(tmp_path, "--study", str(path), "--n-trials", "2")
    assert result.code == 0, result.err
    assert "marked 1 stale trial(s) failed: [1]" in result.out
    trials = load(tmp_path, "stale").trials
    assert trials[1].state == TrialState.FAIL
    assert "stale" in trials[1].user_attrs["error"]
    assert client.get_run(dead_trial_run).info.status == "KILLED"
    assert client.get_run(dead_study_run).info.status == "KILLED"
    # the failed trial does not count: one more trial tops the study up to 2
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE]
    assert not any(r.info.status == "RUNNING" for r in all_runs(client))


# -- several workers ------------------------------------------------------------------------------


def test_two_workers_share_one_study_and_run_exactly_n_trials(tmp_path, empty_mlflow_db,
                                                             monkeypatch):
    client = fresh_store(tmp_path, empty_mlflow_db)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers: see one_torch_thread
    result = run_search(tmp_path, "--study", "coarse", "--n-trials", "5", "--workers", "2")
    assert result.code == 0, result.err
    assert "exited abnormally" not in result.out
    trials = load(tmp_path, "coarse").trials
    assert len(trials) == 5
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    (study_run,) = study_runs(client, "coarse")
    assert study_run.info.status == "FINISHED"
    runs = all_runs(client)
    trial_runs = [r for r in runs if r.info.run_id != study_run.info.run_id]
    assert len(trial_runs) == 5
    assert {r.data.tags[PARENT] for r in trial_runs} == {study_run.info.run_id}
    assert sorted(r.data.tags["pipeline.trial_number"] for r in trial_runs) == list("01234")
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in trial_runs}
    for t in trials:
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == RUN_STATUS[t.state]
    assert not any(r.info.status == "RUNNING" for r in runs)
    assert study_run.data.metrics["n_complete"] + study_run.data.metrics["n_pruned"] == 5
