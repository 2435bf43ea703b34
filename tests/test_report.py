"""Report stage: extraction checked number by number on literal synthetic studies written straight
into a tracking store (report_fixtures.py), the CLI end to end (every file, every image valid, the
CSVs' numbers, the folder logged to MLflow), comparison, the page as a report (title, contents,
indexless formatted tables, self-contained), the error cases, the atomic rewrite, a report on a
real smoke search, and the page opened in a real headless Chromium (at 1280 px: no horizontal
overflow, links resolve, figures fit; print styles).
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

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
    run_report,
    run_search,
    store_uri,
)

from pipeline.cli import EXIT_BAD_INPUT
from pipeline.report import build as report, cli as report_cli, extract as rd, render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDY_FIGURES = ("history", "objective_vs_params", "pair", "parallel_coordinates", "importance",
                 "top_curves", "lr_schedule", "generalisation", "confusion", "misclassified",
                 "correct", "grad_norms")


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


class PageParts(HTMLParser):
    """What the tests read of a page: its title, ids, links, section headings, the contents list,
    image sources and tables (each a list of rows of (tag, class, text) cells)."""

    def __init__(self, page: str):
        super().__init__()
        self.title = self.h1 = ""
        self.ids: list[str] = []
        self.links: list[tuple[str, str]] = []  # (href, text)
        self.contents: list[tuple[str, str]] = []  # the nav's links
        self.h2: list[tuple[str | None, str]] = []  # (id, text)
        self.srcs: list[str] = []
        self.tables: list[list[list[tuple[str, str, str]]]] = []
        self._open: list[tuple[str, dict, list[str]]] = []  # elements whose text is collected
        self._nav = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        elif tag == "nav":
            self._nav = True
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("title", "h1", "h2", "a", "th", "td"):
            self._open.append((tag, a, []))

    def handle_data(self, data):
        for _, _, text in self._open:
            text.append(data)

    def handle_endtag(self, tag):
        if tag == "nav":
            self._nav = False
        if not self._open or self._open[-1][0] != tag:
            return
        _, a, parts = self._open.pop()
        text = "".join(parts).strip()
        if tag in ("title", "h1"):
            setattr(self, tag, text)
        elif tag == "h2":
            self.h2.append((a.get("id"), text))
        elif tag == "a":
            self.links.append((a["href"], text))
            if self._nav:
                self.contents.append((a["href"], text))
        else:
            self.tables[-1][-1].append((tag, a.get("class", ""), text))


def page_parts(folder: Path) -> PageParts:
    return PageParts((folder / "index.html").read_text())


def table_with_header(page: PageParts, first: str) -> list[list[tuple[str, str, str]]]:
    (table,) = [t for t in page.tables if t[0][0][2] == first]
    return table


MD_CONTENTS = re.compile(r"^\d+\. \[(.+)\]\((#[^)]+)\)$", re.M)
TITLE = re.compile(r"Study report: syn-fine on digits, (\d{4}-\d\d-\d\d \d\d:\d\d) UTC")
NUMBER = re.compile(r"-?[\d,]+(\.\d+)?(e[-+]\d+)?")


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
    # Top 3 of COARSE: l2_lambda 1.2e-5, 1.5e-5, 2e-5, padded by 0.25 of their span in log space;
    # they crowd the low edge, so the low side goes that far past the parent's 1e-5 (widened).
    low, high = 1e-5 * (1.2 / 2) ** 0.25, 2e-5 * (2 / 1.2) ** 0.25
    assert rows == [
        {"param": "l2_lambda", "type": "float", "parent_range": "[1e-05, 0.1] (log)",
         "narrowed_range": f"[{low:.4g}, {high:.4g}] (log)", "boundary_flag": "low",
         "edges": f"low 1e-05 → {low:.4g} (widened)"},
        {"param": "eta_max", "type": "float", "parent_range": "[0.001, 1] (log)",
         "narrowed_range": "[0.1807, 0.332] (log)", "boundary_flag": "", "edges": ""},
        {"param": "width", "type": "int", "parent_range": "[16, 256]",
         "narrowed_range": "[110, 218]", "boundary_flag": "", "edges": ""},
        {"param": "cycles", "type": "int", "parent_range": "[1, 3]", "narrowed_range": "[1, 3]",
         "boundary_flag": "", "edges": ""},
        {"param": "activation", "type": "categorical", "parent_range": "{relu, tanh}",
         "narrowed_range": "{relu}", "boundary_flag": "", "edges": ""},
    ]
    assert rows[0]["narrowed_range"] == "[8.801e-06, 2.272e-05] (log)"
    assert rows[0]["edges"] == "low 1e-05 → 8.801e-06 (widened)"
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


# -- hyperparameter importance ------------------------------------------------------------------

# A study whose objective is a known function of eta_max alone (linear in its log); the other
# parameters are drawn at random and do nothing. Every tenth trial from the 5th fails and every
# tenth from the 8th is pruned: importance is over the complete trials, all of them.
N_IMPORTANCE = 30


def eta_only(eta_max: float) -> float:
    return 0.5 + 0.4 * (np.log10(eta_max) + 3) / 3  # 0.5 at eta_max 1e-3, 0.9 at 1


def importance_trials(n: int = N_IMPORTANCE, seed: int = 0) -> list[SynTrial]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        params = {"l2_lambda": float(10 ** rng.uniform(-5, -1)),
                  "eta_max": float(10 ** rng.uniform(-3, 0)),
                  "width": int(rng.integers(16, 257)), "cycles": int(rng.integers(1, 4)),
                  "activation": str(rng.choice(["relu", "tanh"]))}
        if k % 10 == 4:
            out.append(SynTrial(k, "failed", 0, None, None, params))
        elif k % 10 == 7:
            out.append(SynTrial(k, "pruned", 1, 0.3, None, params))
        else:
            value = float(eta_only(params["eta_max"]))
            out.append(SynTrial(k, "complete", 2 * params["cycles"], value,
                                round(value * 360) / 360, params))  # a test_acc of k / 360
    return out


def optuna_fanova(trials: list[SynTrial]) -> dict[str, float]:
    """The oracle: a real Optuna study made straight from the construction (create_trial on
    SPACE's distributions, written out here), fANOVA seeded as the report seeds it."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True),
             "eta_max": FloatDistribution(1e-3, 1.0, log=True),
             "width": IntDistribution(16, 256), "cycles": IntDistribution(1, 3),
             "activation": CategoricalDistribution(["relu", "tanh"])}
    study = optuna.create_study(direction="maximize")
    for t in trials:
        if t.state == "complete":
            study.add_trial(optuna.trial.create_trial(params=t.params, distributions=dists,
                                                      value=t.value))
    raw = optuna.importance.FanovaImportanceEvaluator(seed=0).evaluate(study)
    return {k: v / sum(raw.values()) for k, v in raw.items()}


@pytest.fixture(scope="module")
def importance_store(tmp_path_factory, empty_mlflow_db):
    """syn-importance (importance_trials) and syn-outside (the same, plus a complete trial
    whose width lies outside the space searched, as a study re-made under the same name with
    another space leaves in a store)."""
    from mlflow.tracking import MlflowClient
    from report_fixtures import build_study

    folder = tmp_path_factory.mktemp("importance-store")
    shutil.copyfile(empty_mlflow_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    trials = importance_trials()
    outside = SynTrial(N_IMPORTANCE, "complete", 2, 0.6, 216 / 360,
                       {**trials[0].params, "width": 300})
    build_study(client, "syn-importance", trials, folder=folder)
    build_study(client, "syn-outside", [*trials, outside], folder=folder)
    return SimpleNamespace(folder=folder, uri=uri, client=client, trials=trials,
                           outside=outside)


def test_importance_puts_the_parameter_that_drives_the_objective_first_from_every_trial(
        importance_store):
    trials = importance_store.trials
    data = rd.extract_study(importance_store.client, "syn-importance")
    imp = report.importance(data)
    complete = [t.number for t in trials if t.state == "complete"]
    assert len(complete) == 24 and len(data.complete) == 24
    assert imp.used == complete and imp.left_out == {} and imp.reason == ""  # none dropped
    values = imp.values
    assert set(values) == set(SPACE) and sum(values.values()) == pytest.approx(1.0)
    assert list(values)[0] == "eta_max"  # most important first
    assert values["eta_max"] > 0.8
    assert all(values[n] < 0.1 for n in SPACE if n != "eta_max")
    # Exactly what Optuna's fANOVA says on the trials as constructed: nothing lost or altered
    # on the way through MLflow, and the evaluator is fANOVA (as labelled), seeded.
    assert values == pytest.approx(optuna_fanova(trials), rel=1e-9, abs=1e-12)
    assert report.importance(data) is imp  # computed once, shared with the figure workers


def test_importance_in_the_report_table_and_text(importance_store, tmp_path):
    result = run_report(tmp_path, "--study", "syn-importance",
                        "--no-log", uri=importance_store.uri)
    assert result.code == 0, result.err
    folder = tmp_path / "reports" / "syn-importance"
    table = pd.read_csv(folder / "importance.csv")
    oracle = optuna_fanova(importance_store.trials)
    assert table.param.tolist() == sorted(oracle, key=lambda k: -oracle[k])
    assert table.importance.tolist() == pytest.approx([oracle[k] for k in table.param])
    md = (folder / "report.md").read_text()
    assert "Importance (fANOVA) computed from 24 of 24 complete trials." in md
    assert "importance.png" in assert_complete_report(folder)


def test_importance_says_which_trials_it_left_out_and_why(importance_store, tmp_path):
    """A complete trial it cannot use is named, with the reason, in the report's text; the
    importance is then that of the others (the report used to stop on such a trial)."""
    result = run_report(tmp_path, "--study", "syn-outside", "--no-log", uri=importance_store.uri)
    assert result.code == 0, result.err
    n = importance_store.outside.number
    md = (tmp_path / "reports" / "syn-outside" / "report.md").read_text()
    assert (f"Importance (fANOVA) computed from 24 of 25 complete trials; left out: trial {n} "
            "(width=300 outside [16, 256]).") in md
    table = pd.read_csv(tmp_path / "reports" / "syn-outside" / "importance.csv")
    oracle = optuna_fanova(importance_store.trials)
    assert dict(zip(table.param, table.importance)) == pytest.approx(oracle)


def test_importance_names_a_missing_value_and_why_nothing_was_computed(importance_store):
    import dataclasses

    data = rd.extract_study(importance_store.client, "syn-importance")
    trials = data.trials.copy()
    first = int(data.complete.number.iloc[0])
    trials.loc[trials.number == first, "cycles"] = np.nan  # a run that logged no cycles
    imp = report.importance(dataclasses.replace(data, trials=trials, importance=None))
    assert imp.left_out == {first: "no value for cycles"}
    assert len(imp.used) == 23 and first not in imp.used and imp.values
    assert imp.note().endswith(f"; left out: trial {first} (no value for cycles).")

    flat = data.trials.assign(objective=0.9)  # the objective never varies
    imp = report.importance(dataclasses.replace(data, trials=flat, importance=None))
    assert imp.values == {} and len(imp.used) == 24
    assert imp.note() == ("Importance not computed: the objective has the same value in every "
                          "trial.")
    few = data.trials[data.trials.number.isin([0, 1])]
    imp = report.importance(dataclasses.replace(data, trials=few, importance=None))
    assert imp.values == {} and imp.used == [0, 1]
    assert imp.reason == "2 usable complete trial(s), at least 3 needed"


# -- the CLI end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_report(synthetic_store, tmp_path_factory):
    """``python -m pipeline.report --study syn-fine`` once (its parent syn-coarse alongside)."""
    folder = tmp_path_factory.mktemp("fine-report")
    result = run_report(folder, "--study", "syn-fine", uri=synthetic_store.uri)
    return result, folder / "reports" / "syn-fine"


def test_cli_writes_a_complete_report(fine_report):
    result, folder = fine_report
    assert result.code == 0, result.err
    assert "reports/syn-fine/index.html" in result.out
    names = assert_complete_report(folder)
    # One study with a parent: the side-by-side section, then the study's own figures.
    assert names == ["compare.png", *(f"{f}.png" for f in STUDY_FIGURES)]
    assert {"summary.csv", "top_trials.csv", "narrowing.csv", "importance.csv", "comparison.csv",
            "index.html", "report.md"} <= {p.name for p in
                                                                  folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    page = (folder / "index.html").read_text()
    assert TITLE.search(page) and page.count("<table") == 5


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
    assert ranges.narrowed_range.tolist()[:3] == ["[8.801e-06, 2.272e-05] (log)",
                                                  "[0.1807, 0.332] (log)", "[110, 218]"]
    assert ranges.boundary_flag.tolist() == ["low", "", "", "", ""]
    assert ranges.edges.tolist() == ["low 1e-05 → 8.801e-06 (widened)", "", "", "", ""]

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
    result = run_report(tmp_path, "--study", "syn-coarse",
                        "--study", "syn-fine", "--no-log", uri=synthetic_store.uri)
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
    # Both studies in the title; both headlines before the contents, which lists every section.
    page = page_parts(folder)
    assert re.fullmatch(r"Study report: syn-coarse vs syn-fine on digits, \S+ \S+ UTC",
                        page.title)
    assert [t for _, t in page.contents] == [
        "Headline: syn-coarse", "Headline: syn-fine", "Studies side by side",
        "Study syn-coarse", "Figures: syn-coarse", "Study syn-fine", "Figures: syn-fine"]
    assert [(h, t) for t, h in MD_CONTENTS.findall(md)] == page.contents
    assert md.index("## Headline: syn-fine") < md.index("**Contents**") < md.index(
        "## Studies side by side")


# -- the page reads as a report: title, contents, formatted tables ------------------------------


def test_title_names_the_study_its_dataset_and_the_date(fine_report):
    _, folder = fine_report
    page = page_parts(folder)
    made = datetime.strptime(TITLE.fullmatch(page.title).group(1), "%Y-%m-%d %H:%M")
    now = datetime.now(UTC).replace(tzinfo=None)
    assert now - timedelta(hours=1) < made <= now  # UTC, to the minute, when the report was made
    assert page.h1 == page.title
    assert (folder / "report.md").read_text().splitlines()[0] == f"# {page.title}"


def test_report_title_in_utc_with_every_study_and_dataset():
    made = datetime(2024, 3, 1, 23, 30, 59, tzinfo=timezone(timedelta(hours=-2)))
    a, b, c = (SimpleNamespace(key=k, study_params={"study.dataset": d})
               for k, d in (("a", "digits"), ("b", "mnist"), ("c", "digits")))
    assert report.report_title([a, b, c], made) == \
        "Study report: a vs b vs c on digits, mnist, 2024-03-02 01:30 UTC"
    assert report.report_title([SimpleNamespace(key="old", study_params={})], made) == \
        "Study report: old, 2024-03-02 01:30 UTC"  # a run that logged no dataset


def test_contents_links_resolve_and_markdown_has_the_same_list(fine_report):
    _, folder = fine_report
    page = page_parts(folder)
    md = (folder / "report.md").read_text()
    assert len(page.ids) == len(set(page.ids))
    assert all(href.startswith("#") for href, _ in page.links)  # nothing outside the page
    assert {href[1:] for href, _ in page.links} <= set(page.ids)
    sections = [(f"#{i}", t) for i, t in page.h2 if i is not None]  # all but "Contents"
    assert page.contents == sections == [
        ("#headline-syn-fine", "Headline: syn-fine"),
        ("#studies-side-by-side", "Studies side by side"),
        ("#study-syn-fine", "Study syn-fine"), ("#figures-syn-fine", "Figures: syn-fine")]
    assert [h for h, _ in page.links].count("#top") == len(sections)  # back to top after each
    assert "top" in page.ids
    # report.md: the same list, its anchors the ones GitHub derives from the headings.
    assert [(h, t) for t, h in MD_CONTENTS.findall(md)] == page.contents
    assert re.findall(r"^## (.+)$", md, re.M) == [t for _, t in sections]
    assert [f"#{render.slug(t)}" for _, t in sections] == [h for h, _ in sections]
    # The headline first (the answer), then the contents, then the evidence, in both.
    text = (folder / "index.html").read_text()
    assert md.index("## Headline: syn-fine") < md.index("**Contents**") < md.index(
        "## Studies side by side")
    assert text.index("<h2 id='headline-syn-fine'>") < text.index("<nav") < text.index(
        "<h2 id='studies-side-by-side'>")


def test_page_tables_have_no_positional_index_and_readable_numbers(fine_report):
    _, folder = fine_report
    page = page_parts(folder)
    for table in page.tables:
        first_column = [row[0][2] for row in table[1:]]
        assert first_column != [str(i) for i in range(len(first_column))], table[0]
        for tag, cls, text in (cell for row in table[1:] for cell in row if cell[2]):
            assert cls == ("num" if NUMBER.fullmatch(text) else "text"), (tag, cls, text)
    # The summary: its index (the field names) as row headers, numbers formatted for reading;
    # its CSV keeps them raw.
    summary = table_with_header(page, "")
    assert [c[2] for c in summary[0]] == ["", "value"]
    shown = {row[0][2]: row[1][2] for row in summary[1:]}
    assert all(row[0][:2] == ("th", "text") for row in summary[1:])
    assert list(shown) == list(read_summary(folder / "summary.csv"))
    assert (shown["best_val_acc"], shown["test_acc_of_best"], shown["trials"]) == (
        "0.98", "0.975", "6")
    assert (shown["total_seconds"], shown["median_trial_seconds"]) == ("18.0", "3.0")
    assert shown["epochs_saved_by_pruning"] == "5.0" and shown["parent"] == "syn-coarse"
    # Top trials: no index column, the baseline's accuracy to 4 significant digits.
    top = table_with_header(page, "number")
    csv = pd.read_csv(folder / "top_trials.csv")
    assert len(top) == len(csv) + 1 and [c[2] for c in top[0]][:6] == ["number", *SPACE]
    assert top[1][0] == ("td", "num", "4") and top[-1][0][2].startswith("baseline: ")
    assert [c[2] for c in top[1]][3:6] == ["180", "3", "relu"]  # width, cycles: whole numbers
    raw = csv.objective.iloc[-1]
    assert len(repr(raw)) > 8 and top[-1][csv.columns.get_loc("objective")][2] == f"{raw:.4g}"
    # The comparison: quartiles to 4 significant digits on the page, full precision in the CSV.
    comparison = table_with_header(page, "study")
    q75 = [c[2] for c in comparison[0]].index("q75")
    assert comparison[2][q75][2] == f"{np.quantile([0.975, 0.96, 0.94, 0.98], 0.75):.4g}"
    assert pd.read_csv(folder / "comparison.csv").q75[1] == np.quantile(
        [0.975, 0.96, 0.94, 0.98], 0.75)


def test_page_is_one_self_contained_file(fine_report):
    _, folder = fine_report
    text = (folder / "index.html").read_text()
    page = PageParts(text)
    assert page.srcs and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    for external in ("<link", "<script", "@import", "url(", "http://", "https://", "@font-face"):
        assert external not in text, external
    assert "@media print" in text


@pytest.mark.parametrize("value, shown", [
    (None, ""), (float("nan"), ""), (pd.NA, ""), (np.float64("nan"), ""),
    (0, "0"), (7, "7"), (np.int64(123456), "123,456"), (True, "True"),
    (0.98263888888, "0.9826"), (0.5, "0.5"), (1.2e-05, "1.2e-05"), (0.0, "0"),  # below 1
    (1.0, "1.0"), (29.04, "29.0"), (3.0, "3.0"), (999.9, "999.9"),  # seconds, epochs: 1 decimal
    (999.96, "1,000"), (12345.6, "12,346"), (-2500.0, "-2,500"),  # large: thousands
    ("relu", "relu"), ("[1e-05, 0.1] (log)", "[1e-05, 0.1] (log)"),
])
def test_format_value_is_one_rule_by_magnitude(value, shown):
    assert render.format_value(value) == shown


def test_tables_drop_a_positional_index_keep_a_meaningful_one_and_align_numbers():
    df = pd.DataFrame({"trial": [3, 12], "val_acc": [0.98263888888, 0.5],
                       "train_seconds": [29.04, 1234.6], "n_params": [123456, 7],
                       "note": ["a|b", None]})
    assert render.markdown_table(df).splitlines() == [
        "| trial | val_acc | train_seconds | n_params | note |",
        "|---:|---:|---:|---:|:---|",
        "| 3 | 0.9826 | 29.0 | 123,456 | a\\|b |",
        "| 12 | 0.5 | 1,235 | 7 |  |"]
    sorted_df = df.sort_values("val_acc")  # an integer index left over from sorting: dropped too
    assert render.markdown_table(sorted_df).splitlines()[0] == render.markdown_table(
        df).splitlines()[0]
    (table,) = PageParts(render.html_table(df)).tables
    assert table == [
        [("th", "num", "trial"), ("th", "num", "val_acc"), ("th", "num", "train_seconds"),
         ("th", "num", "n_params"), ("th", "text", "note")],
        [("td", "num", "3"), ("td", "num", "0.9826"), ("td", "num", "29.0"),
         ("td", "num", "123,456"), ("td", "text", "a|b")],
        [("td", "num", "12"), ("td", "num", "0.5"), ("td", "num", "1,235"), ("td", "num", "7"),
         ("td", "text", "")]]
    summary = pd.DataFrame([{"study": "s", "best_val_acc": 0.98263888888, "trials": 1200}]).T
    summary = summary.rename(columns={0: "value"})  # as build.py makes it: the index is the field
    assert render.markdown_table(summary).splitlines() == [
        "|  | value |", "|:---|:---|", "| study | s |", "| best_val_acc | 0.9826 |",
        "| trials | 1,200 |"]
    (table,) = PageParts(render.html_table(summary)).tables
    assert table[1:] == [[("th", "text", "study"), ("td", "text", "s")],
                         [("th", "text", "best_val_acc"), ("td", "num", "0.9826")],
                         [("th", "text", "trials"), ("td", "num", "1,200")]]
    # An integer column made float by a missing value (the baseline row) stays whole numbers.
    gained_nan = pd.DataFrame({"width": [180.0, float("nan")], "seconds": [29.0, 1.5]})
    assert render.markdown_table(gained_nan).splitlines()[2:] == ["| 180 | 29.0 |", "|  | 1.5 |"]
    named = pd.DataFrame({"acc": [0.9, 0.8]}, index=pd.Index([1e-5, 0.1], name="lr"))
    assert render.markdown_table(named).splitlines()[:3] == ["| lr | acc |", "|---:|---:|",
                                                             "| 1e-05 | 0.9 |"]


def test_section_anchors_are_stable_and_unique():
    sections = [render.Section(t) for t in ("Headline: fine", "Study fine", "Study fine", "Top",
                                            "View batch_size", "λ vs η (log)", "!!!")]
    assert render.anchors(sections) == ["headline-fine", "study-fine", "study-fine-1", "top-1",
                                        "view-batch_size", "λ-vs-η-log", "section"]
    assert render.anchors(sections) == render.anchors(list(sections))


# -- error cases: a message, exit code 2, no traceback, nothing written ------------------------


@pytest.mark.parametrize("study, message", [
    ("no-such-study", "no study 'no-such-study' in the tracking store"),
    ("syn-empty", "study 'syn-empty' has no trials yet"),
    ("syn-failed", "study 'syn-failed' has no completed trial ({'failed': 3})"),
], ids=["missing", "no-trials", "all-failed"])
def test_cli_refuses_a_study_it_cannot_report(synthetic_store, tmp_path, study, message):
    result = run_report(tmp_path, "--study", study, uri=synthetic_store.uri)
    assert result.code == EXIT_BAD_INPUT
    assert message in result.err and result.err.startswith("error: ")
    assert "Traceback" not in result.err + result.out
    assert not (tmp_path / "reports").exists()
    if study == "no-such-study":  # says what is there instead
        assert "Studies found: syn-coarse, syn-empty, syn-failed, syn-fine" in result.err
    run = synthetic_store.client.get_run(synthetic_store.studies["syn-failed"].run_id)
    assert "pipeline.report" not in run.data.tags


def test_cli_refuses_one_bad_study_among_several(synthetic_store, tmp_path):
    result = run_report(tmp_path, "--study", "syn-coarse",
                        "--study", "syn-empty", uri=synthetic_store.uri)
    assert result.code == EXIT_BAD_INPUT and "syn-empty" in result.err
    assert not (tmp_path / "reports").exists()


def test_cli_unreachable_store(tmp_path, monkeypatch):
    """No retries allowed (as a user would set them): exit 2 with the URI and the fix."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_report(tmp_path, "--study", "coarse", uri=uri)
    assert result.code == EXIT_BAD_INPUT
    assert f"cannot use the MLflow tracking store '{uri}'" in result.err
    assert "MLFLOW_TRACKING_URI" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "reports").exists()


def test_cli_unreachable_store_fails_fast_with_default_settings(tmp_path, subprocess_env):
    """With MLflow's default HTTP retries (7, exponential backoff) a broken server took
    4 min 18 s to report here; the report (and the store check) must not make a user wait
    minutes. Counted, not timed: a server that drops every connection sees one attempt (the
    subprocess limit only stops a hang)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    attempts = []

    def drop_all():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            attempts.append(1)
            conn.close()  # no answer: the client sees the connection dropped

    threading.Thread(target=drop_all, daemon=True).start()
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.report", "--study", "coarse"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert len(attempts) == 1, f"{len(attempts)} attempts: MLflow's retries were not turned off"
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
    result = run_report(tmp_path, "--study", "syn-fine", "--no-log", uri=synthetic_store.uri)
    assert result.code == 130 and "previous report" in result.err and "Traceback" not in result.err
    assert snapshot(folder) == before
    assert [p.name for p in folder.parent.iterdir()] == ["syn-fine"]


# -- real data: a real smoke search, then its report ----------------------------------------------


def test_report_on_a_real_smoke_search(tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    search = run_search(tmp_path, "--study", "coarse", "--smoke")
    assert search.code == 0, search.err
    result = run_report(tmp_path, "--study", "coarse-smoke", uri=store_uri(tmp_path))
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
    assert TITLE.fullmatch(page.title), page.title
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


FIGURES_JS = """Array.from(document.images, i => ({
  width: i.clientWidth, natural: i.naturalWidth,
  room: i.closest("figure").parentElement.clientWidth, maxWidth: getComputedStyle(i).maxWidth,
  caption: i.closest('figure').querySelector('figcaption') !== null}))"""

PRINT_JS = """({
  back: Array.from(document.querySelectorAll('.back-to-top'), e => getComputedStyle(e).display),
  keep: Array.from(document.querySelectorAll('figure, .table-wrap'),
                   e => getComputedStyle(e).breakInside),
  background: getComputedStyle(document.body).backgroundColor})"""


def png_width(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        return img.width


def test_report_page_fits_1280_px_in_chromium(fine_report, chromium):
    """Laid out 1280 px wide: nothing wider than the window (wide tables scroll in their own
    box), every contents and back-to-top link finds its element, every figure at most the
    content width (one CSS rule, never enlarged) with its caption."""
    _, folder = fine_report
    url = (folder / "index.html").resolve().as_uri()
    layout = chromium.layout(url, 1280)
    assert layout["innerWidth"] == layout["clientWidth"] == 1280
    assert layout["scrollWidth"] <= layout["clientWidth"], layout
    assert layout["bodyScrollWidth"] <= layout["clientWidth"], layout
    assert len(layout["links"]) == 2 * 4 and all(link["found"] for link in layout["links"]), \
        layout["links"]
    assert png_width(chromium.screenshot(url, 1280)) == 1280
    figures = chromium.layout(url, 1280, expression=FIGURES_JS)
    assert len(figures) == 1 + len(STUDY_FIGURES)
    for f in figures:
        assert f["maxWidth"] == "100%" and f["caption"], f
        assert 0 < f["width"] <= min(f["room"], f["natural"]) + 0.5, f


def test_report_page_prints_cleanly(fine_report, chromium):
    """Print: no back-to-top links, figures and tables kept whole on a page, white background."""
    _, folder = fine_report
    url = (folder / "index.html").resolve().as_uri()
    printed = chromium.layout(url, 1280, media="print", expression=PRINT_JS)
    assert printed["back"] and set(printed["back"]) == {"none"}
    # tables (summary, top trials, narrowing, importance, comparison), the contents, figures
    assert len(printed["keep"]) == 5 + 1 + len(STUDY_FIGURES)
    assert set(printed["keep"]) == {"avoid"}
    assert printed["background"] == "rgb(255, 255, 255)"
    screen = chromium.layout(url, 1280, expression=PRINT_JS)
    assert set(screen["back"]) == {"block"}


def test_the_width_check_sees_a_page_that_overflows(fine_report, chromium, tmp_path):
    """The same report with one element 3000 px wide added: the layout check and the
    screenshot both see the overflow (so the checks above mean something)."""
    _, folder = fine_report
    page = (folder / "index.html").read_text()
    wide = tmp_path / "wide.html"
    wide.write_text(page.replace("</main>", "<div style='width:3000px;height:20px'></div></main>"))
    layout = chromium.layout(wide.as_uri(), 1280)
    assert layout["scrollWidth"] > layout["clientWidth"], layout
    assert layout["scrollWidth"] >= 3000
    assert png_width(chromium.screenshot(wide.as_uri(), 1280)) >= 3000


def test_wide_tables_long_words_and_big_figures_stay_inside_1280_px(chromium, tmp_path):
    """A page built to overflow: a 400-character ID in the title, text and caption, a table of
    40 long columns, a figure 3000 px wide. The page still fits; the table scrolls in its box."""
    long_id = "run-" + "0123456789abcdef" * 25
    wide = pd.DataFrame({f"column_{i}_with_a_long_name": [long_id[:60], 0.123456789]
                         for i in range(40)})
    buf = io.BytesIO()
    Image.new("RGB", (3000, 200), "white").save(buf, format="PNG")
    sections = [render.Section(f"Runs {long_id}", f"Run {long_id} was the best.",
                               [("wide", wide)],
                               [("big.png", f"A figure of {long_id}", buf.getvalue())])]
    page = tmp_path / "stress.html"
    page.write_text(render.render_html(f"Study report: {long_id}", sections))
    layout = chromium.layout(page.as_uri(), 1280)
    assert layout["scrollWidth"] <= layout["clientWidth"], layout
    assert all(link["found"] for link in layout["links"])
    boxes = chromium.layout(page.as_uri(), 1280, expression="""(() => {
      const w = document.querySelector('.table-wrap'), i = document.images[0];
      return {wrapScroll: w.scrollWidth, wrapClient: w.clientWidth,
              overflowX: getComputedStyle(w).overflowX, img: i.getBoundingClientRect().width,
              main: document.querySelector('main').clientWidth}; })()""")
    assert boxes["overflowX"] == "auto" and boxes["wrapScroll"] > boxes["wrapClient"], boxes
    assert boxes["img"] <= boxes["main"] < 1280, boxes
    assert png_width(chromium.screenshot(page.as_uri(), 1280)) == 1280
