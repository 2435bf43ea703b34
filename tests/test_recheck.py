"""The re-check: ranking and intervals on literal tables, then a tiny digits study re-checked end
to end (runs, tags, metrics, the report's headline, the final run), resumed after a SIGKILL
without a duplicate, and shared by two worker processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from scipy import stats
from search_fixtures import (
    PARENT,
    all_runs,
    fresh_store,
    load,
    one_torch_thread,
    run_search,
    store_uri,
    study_runs,
    write_study,
)

from pipeline import names
from pipeline.search.rank import headline, paired_difference, rank_candidates, recheck_seed

assert one_torch_thread  # autouse: one torch thread in this module

KEY = "rc"
HANG = 300  # seconds: only a hung process reaches this


# -- ranking on literal tables --------------------------------------------------------------------


def rows(table: dict[int, list[float]], tests: dict[int, list[float]] | None = None) -> list:
    return [{"candidate": c, "seed": i, "value": v,
             "test_acc": (tests or {}).get(c, [None] * len(vs))[i]}
            for c, vs in table.items() for i, v in enumerate(vs)]


def test_the_single_run_best_is_not_always_the_recheck_winner():
    """Trial 3 was selected on a lucky 0.99; over fresh seeds trial 7 is better on average."""
    verdict = rank_candidates(rows({3: [0.95, 0.96, 0.94], 7: [0.97, 0.98, 0.97]}),
                              originals={3: 0.99, 7: 0.975})
    assert verdict["winner"] == 7 and verdict["runner_up"] == 3
    win = verdict["ranking"][0]
    mean, sd = (0.97 + 0.98 + 0.97) / 3, 0.01 / math.sqrt(3)  # sample sd of (0, 0.01, 0) + c
    assert win["val_mean"] == pytest.approx(mean)
    assert win["val_std"] == pytest.approx(sd)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)  # by hand: t(0.975, 2 dof) sd/sqrt(n)
    assert (win["val_ci_low"], win["val_ci_high"]) == pytest.approx((mean - half, mean + half))
    assert verdict["selection_optimism"] == pytest.approx(0.975 - mean)
    assert verdict["ranking"][1]["optimism"] == pytest.approx(0.99 - 0.95)
    diff = verdict["difference"]  # paired per seed: +0.02, +0.02, +0.03
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.07 / 3)
    assert diff["distinguishable"] and diff["ci_low"] > 0


def test_a_tie_is_reported_as_indistinguishable():
    verdict = rank_candidates(rows({5: [0.97, 0.98, 0.96], 2: [0.98, 0.96, 0.97]}),
                              originals={5: 0.99, 2: 0.99})
    assert verdict["winner"] == 2  # equal means: the earlier trial
    diff = verdict["difference"]
    assert diff["mean"] == pytest.approx(0.0) and not diff["distinguishable"]
    assert diff["ci_low"] < 0 < diff["ci_high"]
    text = " ".join(headline(verdict))
    assert "cannot be told apart" in text and "trial 2" in text


def test_pairs_use_only_seeds_both_candidates_ran_and_minimize_ranks_low_first():
    diff = paired_difference({0: {"value": 1.0}, 1: {"value": 2.0}, 2: {"value": 9.0}},
                             {0: {"value": 0.5}, 1: {"value": 1.0}})
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(0.75)
    verdict = rank_candidates(rows({1: [0.30, 0.32], 4: [0.20, 0.22]}), {1: 0.25, 4: 0.21},
                              direction="minimize")
    assert verdict["winner"] == 4
    assert verdict["selection_optimism"] == pytest.approx(0.21 - 0.21)  # mean - single run


def test_diverged_runs_are_left_out_and_recheck_seeds_never_meet_trial_seeds():
    verdict = rank_candidates(rows({1: [0.9, float("nan"), 0.92]}), {1: 0.93})
    assert verdict["ranking"][0]["n"] == 2 and verdict["runner_up"] is None
    seeds = {recheck_seed(0, i) for i in range(10)}
    assert len(seeds) == 10
    assert not seeds & {(0 * 1_000_003 + n) % 2**31 for n in range(10_000)}


# -- end to end ------------------------------------------------------------------------------------


def recheck_study(folder: Path, n_trials: int = 3, top_k: int = 2, seeds: int = 2,
                  epochs: int = 4) -> Path:
    body = {"name": KEY, "sampler": {"name": "random", "seed": 0}, "n_trials": n_trials,
            "fixed": {"schedule": "constant", "epochs": epochs, "batch_size": 64, "threads": 1},
            "space": {"width": {"type": "int", "low": 8, "high": 32},
                      "lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True}},
            "recheck": {"top_k": top_k, "seeds": seeds}}
    return write_study(folder, KEY, json.dumps(body))


def recheck_runs(client) -> list:
    return [r for r in all_runs(client) if r.data.tags.get(names.KIND) == names.KIND_RECHECK]


@pytest.fixture(scope="module")
def rechecked(tmp_path_factory, empty_mlflow_db):
    """A three-trial study with `recheck: {top_k: 2, seeds: 2}`, its report and its final run."""
    folder = tmp_path_factory.mktemp("recheck")
    client = fresh_store(folder, empty_mlflow_db)
    recheck_study(folder)
    search = run_search(folder, "--study", str(folder / f"{KEY}.yaml"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(folder)}
    report = subprocess.run([sys.executable, "-m", "pipeline.report", "--study", KEY], cwd=folder,
                            env=env, capture_output=True, text=True, timeout=HANG)
    final = subprocess.run([sys.executable, "-m", "pipeline.final", "--study",
                            str(folder / f"{KEY}.yaml")], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=HANG)
    return folder, client, search, report, final


def test_recheck_runs_are_child_runs_of_the_study_run_with_their_pair(rechecked):
    folder, client, search, _, _ = rechecked
    assert search.code == 0, search.out + search.err
    (study_run,) = study_runs(client, KEY)
    trials = load(folder, KEY).trials
    top = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                 key=lambda t: (-t.value, t.number))[:2]
    runs = recheck_runs(client)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    pairs = {(r.data.tags[names.TRIAL_NUMBER], r.data.tags[names.RECHECK_SEED]) for r in runs}
    assert pairs == {(str(t.number), str(recheck_seed(0, i))) for t in top for i in range(2)}
    for run in runs:
        assert run.data.tags[PARENT] == study_run.info.run_id
        assert run.data.tags[names.STUDY] == KEY
        number = int(run.data.tags[names.TRIAL_NUMBER])
        trial = trials[number]
        assert run.data.params["seed"] == run.data.tags[names.RECHECK_SEED]  # a fresh seed
        assert float(run.data.params["width"]) == trial.params["width"]  # the candidate's config
        assert {"val_acc", "test_acc", "objective"} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert len(history) == 4  # every epoch, as a trial run logs it
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"history.csv", "config.json", "examples.npz"} <= files


def test_the_study_run_names_the_winner_with_its_interval(rechecked):
    folder, client, search, _, _ = rechecked
    (study_run,) = study_runs(client, KEY)
    m, tags = study_run.data.metrics, study_run.data.tags
    runs = recheck_runs(client)
    by_candidate: dict[int, list] = {}
    for r in runs:
        by_candidate.setdefault(int(r.data.tags[names.TRIAL_NUMBER]), []).append(r)
    means = {c: sum(r.data.metrics["objective"] for r in rs) / len(rs)
             for c, rs in by_candidate.items()}
    winner = min(means, key=lambda c: (-means[c], c))
    assert tags[names.WINNER_TRIAL] == str(winner)
    assert m[names.WINNER_VAL_MEAN] == pytest.approx(means[winner])
    assert m[names.N_RECHECK_RUNS] == 4
    assert m[names.WINNER_VAL_CI_LOW] <= m[names.WINNER_VAL_MEAN] <= m[names.WINNER_VAL_CI_HIGH]
    original = load(folder, KEY).trials[winner].value
    assert m[names.SELECTION_OPTIMISM] == pytest.approx(original - means[winner])
    tests = [r.data.metrics["test_acc"] for r in by_candidate[winner]]
    assert m[names.WINNER_TEST_MEAN] == pytest.approx(sum(tests) / len(tests))
    assert tags[names.BEST_TRIAL_RUN] == load(folder, KEY).trials[winner].user_attrs[
        "mlflow_run_id"]  # the logged model is the winner's
    assert f"winner: trial {winner}" in search.out and "runner-up" in search.out


def test_the_report_opens_with_the_headline(rechecked):
    folder, client, _, report, _ = rechecked
    assert report.returncode == 0, report.stderr
    winner = study_runs(client, KEY)[0].data.tags[names.WINNER_TRIAL]
    md = (folder / "reports" / KEY / "report.md").read_text()
    html = (folder / "reports" / KEY / "index.html").read_text()
    first = md.split("\n## ")[1]
    assert first.startswith(f"Headline: {KEY}") and f"Winner: trial {winner}" in first
    assert "95 % interval" in first and "Runner-up" in first and "optimism" in first
    assert f"python -m pipeline.final --study {KEY}" in first
    assert (folder / "reports" / KEY / "recheck.png").is_file()
    assert html.index(f"Winner: trial {winner}") < html.index("Figures:")


def test_final_retrains_the_rechecked_winner(rechecked):
    _, client, _, _, final = rechecked
    assert final.returncode == 0, final.stderr
    winner = study_runs(client, KEY)[0].data.tags[names.WINNER_TRIAL]
    (run,) = [r for r in all_runs(client) if r.data.tags.get(names.KIND) == names.KIND_FINAL]
    assert run.data.tags[names.FINAL_TRIAL_NUMBER] == winner
    assert f"retraining trial {winner}: re-checked winner" in final.stdout


def test_the_recheck_command_adds_only_missing_runs(rechecked):
    """`python -m pipeline.recheck` with a third seed: two new runs (one per candidate), in a
    new execution run of the study; nothing else is trained."""
    folder, client, _, _, _ = rechecked
    before = {r.info.run_id for r in recheck_runs(client)}
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(folder)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.recheck", "--study",
                           str(folder / f"{KEY}.yaml"), "--seeds", "3", "--quiet"], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = [r for r in recheck_runs(client) if r.info.run_id not in before]
    assert sorted(r.data.tags[names.RECHECK_SEED] for r in new) == [str(recheck_seed(0, 2))] * 2
    assert len(load(folder, KEY).trials) == 3  # no search trial
    latest = study_runs(client, KEY)[0]
    assert latest.data.metrics[names.N_RECHECK_RUNS] == 6
    assert {r.data.tags[PARENT] for r in new} == {latest.info.run_id}


@pytest.mark.parametrize("storage, words", [
    (None, ["no completed trial", "Run it first: python -m pipeline.search"]),
    ("sqlite:///optuna.db", ["no completed trial", "Run it first: python -m pipeline.search"]),
    ("optuna.txt", ["storage 'optuna.txt' is not understood", "sqlite:///PATH"]),
], ids=["journal", "sqlite", "malformed storage URL"])
def test_a_recheck_of_a_study_that_never_ran_is_refused_and_creates_nothing(tmp_path, storage,
                                                                            words):
    recheck_study(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.recheck", "--study",
                           str(tmp_path / f"{KEY}.yaml"), *(["--storage", storage] if storage
                                                             else [])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY}.yaml"]


def test_two_workers_share_the_recheck_one_run_per_pair(tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    recheck_study(tmp_path, n_trials=3, top_k=3, seeds=2)
    result = run_search(tmp_path, "--study", str(tmp_path / f"{KEY}.yaml"), "--workers", "2")
    assert result.code == 0, result.out + result.err
    runs = recheck_runs(client)
    pairs = [(r.data.tags[names.TRIAL_NUMBER], r.data.tags[names.RECHECK_SEED]) for r in runs]
    assert len(pairs) == 6 == len(set(pairs))  # top_k x seeds, each exactly once
    checks = load(tmp_path, f"{KEY}-recheck").trials
    assert [t.state for t in checks] == [TrialState.COMPLETE] * 6


def test_a_recheck_worker_killed_mid_run_is_redone_once_without_duplicates(tmp_path,
                                                                           empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    recheck_study(tmp_path, n_trials=2, top_k=2, seeds=2, epochs=15)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": store_uri(tmp_path), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "pipeline.search", "--study", str(tmp_path / f"{KEY}.yaml"),
            "--quiet"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        killed = _wait_mid_recheck(tmp_path, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(HANG)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=HANG)
    assert again.returncode == 0, again.stdout + again.stderr
    checks = load(tmp_path, f"{KEY}-recheck").trials
    assert checks[killed].state == TrialState.FAIL
    done = [(t.user_attrs[names.CANDIDATE], t.user_attrs[names.SEED_INDEX]) for t in checks
            if t.state == TrialState.COMPLETE]
    assert len(done) == 4 == len(set(done))  # every pair once, the killed one redone
    finished = [r for r in recheck_runs(client) if r.info.status == "FINISHED"]
    assert len(finished) == 4
    assert not [r for r in all_runs(client) if r.info.status == "RUNNING"]
    killed_run = client.get_run(checks[killed].user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "KILLED"


def _wait_mid_recheck(folder: Path, proc) -> int:
    """The number of a re-check trial in its training loop (an epoch reported, not the last) whose
    run is made (the writer process makes it while the trial trains)."""
    import time

    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the search ended before a re-check trial was caught"
        try:
            study = optuna.load_study(study_name=f"{KEY}-recheck",
                                      storage=load(folder, KEY)._storage)
        except KeyError:
            time.sleep(0.05)
            continue
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if 0 < len(t.intermediate_values) < 15 and "mlflow_run_id" in t.user_attrs]
        if running:
            return running[0].number
        time.sleep(0.05)
    raise AssertionError("no re-check trial caught in its training loop")
