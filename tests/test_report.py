"""Report stage: extraction checked number by number on literal synthetic studies written straight
into a tracking store (report_fixtures.py), the CLI end to end (every file, every image valid, the
CSVs' numbers, the folder logged to MLflow), comparison, the error cases, the atomic rewrite, a
report on a real smoke search, and the page opened in a real headless Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_fixtures import (  # noqa: F401  (fixtures)
    COARSE,
    FINE,
    SPACE,
    SynTrial,
    cfg_for,
    chromium,
    digits_test_labels,
    synthetic_store,
)
from search_fixtures import (
    Outcome,
    artifact_paths,
    free_port,
    fresh_store,
    load,
    one_torch_thread,  # noqa: F401  (autouse: the smoke search)
    run_search,
    store_uri,
)

from pipeline.cli import EXIT_BAD_INPUT
from pipeline.report import build as report, cli as report_cli, extract as rd, render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDY_FIGURES = ("history", "objective_vs_params", "pair", "parallel_coordinates", "importance",
                 "top_curves", "lr_schedule", "generalisation", "confusion", "misclassified",
                 "correct", "grad_norms")


def run_report(folder: Path, uri: str, *argv: str) -> Outcome:
    """``python -m pipeline.report ARGV`` in-process, cwd ``folder``, tracking store ``uri``."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = report_cli.main(list(argv))
    return Outcome(code, out.getvalue(), err.getvalue())


def by_number(trials: list[SynTrial]) -> dict[int, SynTrial]:
    return {t.number: t for t in trials}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def read_summary(path: Path) -> dict[str, str]:
    return pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)["value"].to_dict()


def assert_valid_png(data: bytes, name: str) -> None:
    assert len(data) > 0 and data[:8] == PNG_SIGNATURE, f"{name}: not a PNG"
    with Image.open(io.BytesIO(data)) as img:
        img.verify()  # checksums and structure
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # and it decodes
        assert img.format == "PNG" and img.width > 0 and img.height > 0, name


def assert_complete_report(folder: Path) -> list[str]:
    """index.html and report.md exist and name the same figures, every one a valid PNG file in
    the folder, embedded in the page byte for byte; returns the figure file names."""
    md = (folder / "report.md").read_text()
    page = (folder / "index.html").read_text()
    in_md = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", md)
    assert in_md and all(alt == target for alt, target in in_md)
    in_html = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>", page)
    names = [f for _, f in in_md]
    assert [alt for alt, _ in in_html] == names
    assert sorted(names) == sorted(p.name for p in folder.glob("*.png"))
    for (name, data) in in_html:
        on_disk = (folder / name).read_bytes()
        assert base64.b64decode(data) == on_disk, f"{name}: page and file differ"
        assert_valid_png(on_disk, name)
    for ref in re.findall(r"\(`([^`]+\.csv)`\)", md):
        assert (folder / ref).is_file(), ref
    return names


def expected_summary(trials: list[SynTrial]) -> dict[str, float]:
    """The summary table computed straight from the construction (an independent oracle)."""
    done = [t for t in trials if t.state == "complete"]
    best = min(done, key=lambda t: (-t.value, t.number))
    pruned = [t for t in trials if t.state == "pruned"]
    return {"trials": len(trials), "complete": len(done), "pruned": len(pruned),
            "failed": sum(t.state == "failed" for t in trials), "running": 0,
            "best_trial": best.number, "best_val_acc": best.value,
            "test_acc_of_best": best.test_acc,
            "total_seconds": sum(t.wall_seconds for t in trials),
            "median_trial_seconds": float(np.median([t.wall_seconds for t in trials])),
            "epochs_run": sum(t.epochs_run for t in trials),
            "epochs_saved_by_pruning": sum(t.epochs_planned - t.epochs_run for t in pruned)}


# -- extraction, tested on its own --------------------------------------------------------------


@pytest.fixture(scope="module")
def coarse(synthetic_store) -> rd.StudyData:
    return rd.extract_study(synthetic_store.client, "syn-coarse")


@pytest.fixture(scope="module")
def fine(synthetic_store) -> rd.StudyData:
    return rd.extract_study(synthetic_store.client, "syn-fine")


def test_trials_frame_has_one_typed_row_per_trial(coarse, synthetic_store):
    t = coarse.trials
    built = synthetic_store.studies["syn-coarse"]
    assert list(t.number) == list(range(10))
    assert list(t.run_id) == [built.trial_runs[n] for n in range(10)]
    assert t.state.tolist() == ["complete", "complete", "pruned", "complete", "failed",
                                "complete", "pruned", "complete", "complete", "complete"]
    assert coarse.param_names == list(SPACE)
    for row, syn in zip(t.itertuples(), COARSE):
        assert {n: getattr(row, n) for n in SPACE} == syn.params  # values and types round-trip
        assert type(row.width) is int and type(row.activation) is str
        assert row.epochs_run == syn.epochs_run and row.epochs_planned == syn.epochs_planned
        assert row.wall_seconds == syn.wall_seconds
        if syn.state == "complete":  # the best epoch, not the last one
            assert row.objective == syn.value and row.last_value == pytest.approx(syn.value - 0.01)
            assert row.test_acc == syn.test_acc and row.n_params == syn.n_params
        else:
            assert pd.isna(row.objective) and pd.isna(row.test_acc)
    assert t.loc[2, "last_value"] == pytest.approx(0.40)  # a pruned trial: its last epoch
    assert t.loc[2, "pruned_reason"] == "pruned at epoch 1"


def test_summary_table_numbers(coarse, fine):
    assert rd.summary_table(coarse) == {
        "study": "syn-coarse", "dataset": "digits", "sampler": "qmc", "pruner": "median",
        "parent": "", "trials": 10, "complete": 7, "pruned": 2, "failed": 1, "running": 0,
        "best_trial": 3,  # ties trial 7 at 0.97: the earlier wins
        "best_val_acc": 0.97, "test_acc_of_best": 0.95, "total_seconds": 29.0,
        "median_trial_seconds": 3.0, "epochs_run": 29.0,
        "epochs_saved_by_pruning": 7.0}  # trial 2: 6 planned - 1 run; trial 6: 4 - 2
    s = rd.summary_table(fine)
    assert s["parent"] == "syn-coarse" and s["sampler"] == "tpe"
    assert {k: s[k] for k in expected_summary(FINE)} == pytest.approx(expected_summary(FINE))
    assert (s["best_trial"], s["best_val_acc"], s["test_acc_of_best"]) == (4, 0.98, 0.975)
    assert s["epochs_saved_by_pruning"] == 5.0


def test_objective_stats_against_numpy_on_the_literal_values(coarse, fine):
    values = [0.80, 0.93, 0.97, 0.85, 0.97, 0.60, 0.90]  # COARSE's complete trials, in order
    stats = rd.objective_stats(coarse)
    assert stats == pytest.approx({"best": 0.97, "q75": np.quantile(values, 0.75),
                                   "median": np.median(values),
                                   "q25": np.quantile(values, 0.25), "trials_to_best": 4})
    assert (stats["q25"], stats["median"], stats["q75"]) == pytest.approx((0.825, 0.90, 0.95))
    fine_values = [0.975, 0.96, 0.94, 0.98]
    assert rd.objective_stats(fine) == pytest.approx({
        "best": 0.98, "q75": np.quantile(fine_values, 0.75), "median": np.median(fine_values),
        "q25": np.quantile(fine_values, 0.25), "trials_to_best": 5})


def test_best_so_far_is_the_running_best_at_every_trial(coarse):
    """Pruned and failed trials keep the best so far: the history figure draws this column as
    its 'best so far' line, which NaN rows would break into pieces."""
    t = rd.best_so_far(coarse)
    assert t.number.tolist() == list(range(10))
    assert t.best_so_far.tolist() == pytest.approx(
        [0.80, 0.93, 0.93, 0.97, 0.97, 0.97, 0.97, 0.97, 0.97, 0.97])


def test_top_trials_are_ranked_best_first_ties_by_number(coarse):
    top = rd.top_trials(coarse)
    assert top.number.tolist() == [3, 7, 1, 9, 5, 0, 8]
    trials = by_number(COARSE)
    assert top.test_acc.tolist() == [trials[n].test_acc for n in top.number]
    assert top.n_params.tolist() == [trials[n].n_params for n in top.number]
    assert list(top.columns[:6]) == ["number", *SPACE]
    assert rd.top_trials(coarse, n=2).number.tolist() == [3, 7]


def test_histories_of_the_top_trials_and_the_best_trials_artifacts(coarse):
    assert sorted(coarse.histories) == [1, 3, 5, 7, 9]  # the top 5 only
    best = coarse.histories[3]
    syn = by_number(COARSE)[3]
    assert best.step.tolist() == [12, 24, 36, 48, 60, 72]  # step = updates (12 an epoch)
    assert best.val_acc.tolist() == pytest.approx(syn.val_accs())
    assert {"grad_norm/fc1", "grad_norm/fc2", "grad_norm/out"} <= set(best.columns)
    assert not any(c.startswith("grad_norm/") for c in coarse.histories[7].columns)
    art = coarse.best_artifacts
    assert art["config"] == cfg_for(syn)
    labels = digits_test_labels()
    assert art["predictions"].shape == (360,) and art["predictions"].dtype == np.int16
    assert float((art["predictions"] == labels).mean()) == pytest.approx(0.95)
    assert art["confusion"].shape == (10, 10)
    assert int(np.trace(art["confusion"].to_numpy())) == 342


def test_range_changes_from_narrowing_json(fine):
    rows = rd.range_changes(fine).to_dict("records")
    # Top 3 of COARSE: l2_lambda 1.2e-5, 1.5e-5, 2e-5, padded by 0.25 of their span in log space.
    low, high = 1.2e-5 * (1.2 / 2) ** 0.25, 2e-5 * (2 / 1.2) ** 0.25
    assert rows == [
        {"param": "l2_lambda", "type": "float", "parent_range": "[1e-05, 0.1] (log)",
         "narrowed_range": f"[{low:.4g}, {high:.4g}] (log)", "boundary_flag": "low"},
        {"param": "eta_max", "type": "float", "parent_range": "[0.001, 1] (log)",
         "narrowed_range": "[0.1807, 0.332] (log)", "boundary_flag": ""},
        {"param": "width", "type": "int", "parent_range": "[16, 256]",
         "narrowed_range": "[110, 218]", "boundary_flag": ""},
        {"param": "cycles", "type": "int", "parent_range": "[1, 3]", "narrowed_range": "[1, 3]",
         "boundary_flag": ""},
        {"param": "activation", "type": "categorical", "parent_range": "{relu, tanh}",
         "narrowed_range": "{relu}", "boundary_flag": ""},
    ]
    assert rows[0]["narrowed_range"] == "[1.056e-05, 2.272e-05] (log)"
    assert fine.space["l2_lambda"]["low"] == pytest.approx(low)


def test_boundary_flags_and_compare_studies(coarse, fine):
    assert rd.boundary_flags(coarse) == {"l2_lambda": "low"}
    assert rd.boundary_flags(fine) == {"cycles": "high", "l2_lambda": "low (parent)"}
    table = rd.compare_studies([coarse, fine])
    assert table.to_dict("records") == [
        {"study": "syn-coarse", "sampler": "qmc", "trials": 10, "complete": 7, "pruned": 2,
         "failed": 1, "best": 0.97, "q75": pytest.approx(0.95), "median": pytest.approx(0.90),
         "q25": pytest.approx(0.825), "trials_to_best": 4, "test_acc_of_best": 0.95,
         "boundary_flags": "l2_lambda:low"},
        {"study": "syn-fine", "sampler": "tpe", "trials": 6, "complete": 4, "pruned": 1,
         "failed": 1, "best": 0.98, "q75": pytest.approx(0.97625),
         "median": pytest.approx(0.9675), "q25": pytest.approx(0.955), "trials_to_best": 5,
         "test_acc_of_best": 0.975, "boundary_flags": "cycles:high, l2_lambda:low (parent)"},
    ]


@pytest.mark.parametrize("params, planned", [
    ({"schedule": "cyclical", "step_size_epochs": "2", "cycles": "3"}, 12.0),
    ({"schedule": "constant", "epochs": "7"}, 7.0),
    ({"step_size_epochs": "1", "cycles": "2"}, 4.0),  # cyclical is the default
])
def test_planned_epochs(params, planned):
    assert rd.planned_epochs(params) == planned


def test_planned_epochs_unknown_is_nan():
    assert np.isnan(rd.planned_epochs({"schedule": "constant"}))


# -- the CLI end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_report(synthetic_store, tmp_path_factory):
    """``python -m pipeline.report --study syn-fine`` once (its parent syn-coarse alongside)."""
    folder = tmp_path_factory.mktemp("fine-report")
    result = run_report(folder, synthetic_store.uri, "--study", "syn-fine")
    return result, folder / "reports" / "syn-fine"


def test_cli_writes_a_complete_report(fine_report):
    result, folder = fine_report
    assert result.code == 0, result.err
    assert "reports/syn-fine/index.html" in result.out
    names = assert_complete_report(folder)
    # One study with a parent: the side-by-side section, then the study's own figures.
    assert names == ["compare.png", *(f"{f}.png" for f in STUDY_FIGURES)]
    assert {"summary.csv", "top_trials.csv", "narrowing.csv", "comparison.csv",
            "index.html", "report.md"} <= {p.name for p in
                                                                  folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    page = (folder / "index.html").read_text()
    assert "<title>Study report: syn-fine</title>" in page and page.count("<table") == 4


def test_cli_tables_hold_the_constructed_numbers(fine_report):
    _, folder = fine_report
    summary = read_summary(folder / "summary.csv")
    assert summary["study"] == "syn-fine" and summary["parent"] == "syn-coarse"
    assert {k: float(summary[k]) for k in expected_summary(FINE)} == pytest.approx(
        expected_summary(FINE))

    top = pd.read_csv(folder / "top_trials.csv")
    assert top.number.tolist()[:4] == ["4", "0", "1", "2"]
    assert top.objective.tolist()[:4] == pytest.approx([0.98, 0.975, 0.96, 0.94])
    assert top.test_acc.tolist()[:4] == pytest.approx([0.975, 0.955, 0.95, 0.93])
    # The last row is the constant predictor; its accuracies computed here from the splits.
    from pipeline.training.data import load_splits

    s = load_splits("digits")
    majority = int(np.bincount(s.y_train.numpy()).argmax())
    base = top.iloc[-1]
    assert base.number == f"baseline: always predict class {majority}" and base.n_params == 0
    assert base.objective == pytest.approx(float((s.y_val.numpy() == majority).mean()))
    assert base.test_acc == pytest.approx(float((s.y_test.numpy() == majority).mean()))

    ranges = pd.read_csv(folder / "narrowing.csv", keep_default_na=False)
    assert ranges.param.tolist() == list(SPACE)
    assert ranges.narrowed_range.tolist()[:3] == ["[1.056e-05, 2.272e-05] (log)",
                                                  "[0.1807, 0.332] (log)", "[110, 218]"]
    assert ranges.boundary_flag.tolist() == ["low", "", "", "", ""]

    comparison = pd.read_csv(folder / "comparison.csv")
    assert comparison.study.tolist() == ["syn-coarse", "syn-fine"]  # the parent, then the study
    assert comparison.best.tolist() == [0.97, 0.98]
    assert comparison.trials_to_best.tolist() == [4, 5]
    assert comparison.q25.tolist() == pytest.approx([0.825, 0.955])


def test_cli_logs_the_folder_to_the_study_run(fine_report, synthetic_store):
    _, folder = fine_report
    run_id = synthetic_store.studies["syn-fine"].run_id
    logged = artifact_paths(synthetic_store.client, run_id, "report")
    assert logged == {f"report/{p.name}" for p in folder.iterdir()}
    # The tag says where the folder is, from anywhere (not relative to the cwd of the run).
    tag = synthetic_store.client.get_run(run_id).data.tags["pipeline.report"]
    assert Path(tag).is_absolute() and Path(tag) == folder.resolve()
    # Nothing logged on the parent's run.
    coarse_run = synthetic_store.studies["syn-coarse"].run_id
    assert not artifact_paths(synthetic_store.client, coarse_run, "report")


def test_cli_compares_two_studies(synthetic_store, tmp_path):
    result = run_report(tmp_path, synthetic_store.uri, "--study", "syn-coarse",
                        "--study", "syn-fine", "--no-log")
    assert result.code == 0, result.err
    folder = tmp_path / "reports" / "syn-coarse-vs-syn-fine"
    names = assert_complete_report(folder)
    assert names == ["compare.png", *(f"{k}_{f}.png" for k in ("syn-coarse", "syn-fine")
                                      for f in STUDY_FIGURES)]
    comparison = pd.read_csv(folder / "comparison.csv", keep_default_na=False)
    assert comparison.study.tolist() == ["syn-coarse", "syn-fine"]
    assert comparison[["trials", "complete", "pruned", "failed"]].to_numpy().tolist() == [
        [10, 7, 2, 1], [6, 4, 1, 1]]
    assert comparison.test_acc_of_best.tolist() == [0.95, 0.975]
    # Each study's own tables land in files of their own, not one overwriting the other.
    md = (folder / "report.md").read_text()
    tables = re.findall(r"\(`([^`]+\.csv)`\)", md)
    assert len(tables) == len(set(tables)), f"two tables share a file: {tables}"
    studies = {read_summary(p)["study"] for p in folder.glob("*.csv")
               if pd.read_csv(p).columns.tolist() == ["Unnamed: 0", "value"]}
    assert studies == {"syn-coarse", "syn-fine"}


# -- error cases: a message, exit code 2, no traceback, nothing written ------------------------


@pytest.mark.parametrize("study, message", [
    ("no-such-study", "no study 'no-such-study' in the tracking store"),
    ("syn-empty", "study 'syn-empty' has no trials yet"),
    ("syn-failed", "study 'syn-failed' has no completed trial ({'failed': 3})"),
], ids=["missing", "no-trials", "all-failed"])
def test_cli_refuses_a_study_it_cannot_report(synthetic_store, tmp_path, study, message):
    result = run_report(tmp_path, synthetic_store.uri, "--study", study)
    assert result.code == EXIT_BAD_INPUT
    assert message in result.err and result.err.startswith("error: ")
    assert "Traceback" not in result.err + result.out
    assert not (tmp_path / "reports").exists()
    if study == "no-such-study":  # says what is there instead
        assert "Studies found: syn-coarse, syn-empty, syn-failed, syn-fine" in result.err
    run = synthetic_store.client.get_run(synthetic_store.studies["syn-failed"].run_id)
    assert "pipeline.report" not in run.data.tags


def test_cli_refuses_one_bad_study_among_several(synthetic_store, tmp_path):
    result = run_report(tmp_path, synthetic_store.uri, "--study", "syn-coarse",
                        "--study", "syn-empty")
    assert result.code == EXIT_BAD_INPUT and "syn-empty" in result.err
    assert not (tmp_path / "reports").exists()


def test_cli_unreachable_store(tmp_path, monkeypatch):
    """No retries allowed (as a user would set them): exit 2 with the URI and the fix."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_report(tmp_path, uri, "--study", "coarse")
    assert result.code == EXIT_BAD_INPUT
    assert f"cannot use the MLflow tracking store '{uri}'" in result.err
    assert "MLFLOW_TRACKING_URI" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "reports").exists()


def test_cli_unreachable_store_fails_fast_with_default_settings(tmp_path, subprocess_env):
    """With MLflow's default HTTP retries (7, exponential backoff) a refused connection took
    4 min 18 s to report here; the report (and the store check) must not make a user wait
    minutes for 'connection refused'. The limit guards against a hang, not a speed target."""
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.report", "--study", "coarse"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("an unreachable tracking store was still being retried after 30 s")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "cannot use the MLflow tracking store" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()


# -- re-running replaces the folder atomically ----------------------------------------------------


def _sections(label: str, extra_figure: bool = False) -> list[render.Section]:
    from matplotlib.figure import Figure

    from pipeline.figures import to_png

    fig = Figure(figsize=(2, 1))
    fig.subplots().set_title(label)
    figures = [("a.png", f"caption {label}", to_png(fig, dpi=30))]
    if extra_figure:
        figures.append(("only_in_old.png", "old", to_png(fig, dpi=20)))
    table = pd.DataFrame({"label": [label], "value": [1.5]})
    return [render.Section(f"Section {label}", "text", [("table", table)], figures)]


def test_rewrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "reports" / "study"
    render.write_report(out, "old", _sections("old", extra_figure=True))
    render.write_report(out, "new", _sections("new"))
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "index.html", "report.md",
                                                     "table.csv"]
    assert "# new" in (out / "report.md").read_text()
    assert pd.read_csv(out / "table.csv").label.tolist() == ["new"]
    assert [p.name for p in out.parent.iterdir()] == ["study"]  # no temporary or old folder


@pytest.mark.parametrize("where", ["markdown", "html", "swap"])
def test_interrupted_rewrite_leaves_the_old_report_intact(tmp_path, monkeypatch, where):
    """Ctrl-C at each point of writing (after the CSVs and PNGs, while rendering the page, while
    swapping the folders): the previous report stays in place, whole, and no temporary folder is
    left behind."""
    out = tmp_path / "reports" / "study"
    render.write_report(out, "old", _sections("old", extra_figure=True))
    before = snapshot(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "markdown":
        monkeypatch.setattr(render, "render_markdown", interrupt)
    elif where == "html":
        monkeypatch.setattr(render, "render_html", interrupt)
    else:  # the new folder's rename into place
        real_rename = Path.rename

        def rename(self, target):
            if Path(target) == out and self.name.startswith(".study-") and "-old-" not in self.name:
                raise KeyboardInterrupt
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        render.write_report(out, "new", _sections("new"))
    monkeypatch.undo()
    assert out.is_dir() and snapshot(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["study"]


def test_interrupted_cli_run_keeps_the_previous_report(fine_report, synthetic_store, tmp_path,
                                                       monkeypatch):
    """A report interrupted while rendering its figures (third PNG) through the CLI."""
    import pipeline.figures

    _, done = fine_report
    folder = tmp_path / "reports" / "syn-fine"
    shutil.copytree(done, folder)
    before = snapshot(folder)
    real_to_png, calls = pipeline.figures.to_png, []

    def to_png(fig, dpi=100):
        calls.append(fig)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_to_png(fig, dpi)

    monkeypatch.setattr(pipeline.figures, "to_png", to_png)
    result = run_report(tmp_path, synthetic_store.uri, "--study", "syn-fine", "--no-log")
    assert result.code == 130 and "previous report" in result.err and "Traceback" not in result.err
    assert snapshot(folder) == before
    assert [p.name for p in folder.parent.iterdir()] == ["syn-fine"]


# -- real data: a real smoke search, then its report ----------------------------------------------


def test_report_on_a_real_smoke_search(tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    search = run_search(tmp_path, "--study", "coarse", "--smoke")
    assert search.code == 0, search.err
    result = run_report(tmp_path, store_uri(tmp_path), "--study", "coarse-smoke")
    assert result.code == 0, result.err
    folder = tmp_path / "reports" / "coarse-smoke"
    assert assert_complete_report(folder) == [f"{f}.png" for f in STUDY_FIGURES]

    study = load(tmp_path, "coarse-smoke")
    states = [t.state.name for t in study.trials]
    summary = read_summary(folder / "summary.csv")
    assert int(summary["trials"]) == len(study.trials)
    assert int(summary["complete"]) == states.count("COMPLETE")
    assert int(summary["pruned"]) == states.count("PRUNED")
    assert int(summary["failed"]) == states.count("FAIL")
    assert int(summary["best_trial"]) == study.best_trial.number
    assert float(summary["best_val_acc"]) == pytest.approx(study.best_value)
    assert float(summary["test_acc_of_best"]) == pytest.approx(
        study.best_trial.user_attrs["test_acc"])
    top = pd.read_csv(folder / "top_trials.csv")
    ranked = sorted((t for t in study.trials if t.state.name == "COMPLETE"),
                    key=lambda t: (-t.value, t.number))
    assert top.number.tolist()[:-1] == [str(t.number) for t in ranked]  # then the baseline
    study_run = study.user_attrs["mlflow_run_id"]
    assert {f"report/{p.name}" for p in folder.iterdir()} == artifact_paths(client, study_run,
                                                                             "report")


# -- the page in a real browser -----------------------------------------------------------------


def test_report_page_in_headless_chromium(fine_report, chromium):
    _, folder = fine_report
    page = chromium.check_page((folder / "index.html").resolve().as_uri())
    assert page.title == "Study report: syn-fine"
    assert page.errors == []
    figures = re.findall(r"!\[([^\]]+)\]", (folder / "report.md").read_text())
    assert [i["alt"] for i in page.images] == figures
    for img in page.images:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img


def test_the_browser_check_sees_broken_images_and_errors(chromium, tmp_path):
    """The same check on a page with a broken image, a console error and an uncaught exception
    reports all three (so an empty error list above means something)."""
    good = base64.b64encode(_tiny_png()).decode()
    (tmp_path / "bad.html").write_text(
        "<!doctype html><html><head><title>bad</title></head><body>"
        f"<img alt='good' src='data:image/png;base64,{good}'>"
        "<img alt='broken' src='data:image/png;base64,iVBORw0KGgoAAAA'>"
        "<script>console.error('boom')</script><script>throw new Error('kaput')</script>"
        "</body></html>")
    page = chromium.check_page((tmp_path / "bad.html").as_uri())
    sizes = {i["alt"]: i["width"] for i in page.images}
    assert sizes["good"] > 0 and sizes["broken"] == 0
    assert any("boom" in e for e in page.errors)
    assert any("kaput" in e for e in page.errors)


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), "red").save(buf, format="PNG")
    return buf.getvalue()
