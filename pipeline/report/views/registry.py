"""Report views: a study's own figures and tables, added as one section after the standard report.

A study file names the views that answer its question; the standard report is always written,
and each view adds a section (a sentence of answer, tables, figures with captions):

    report: {views: [curves]}        # e.g. studies/learning_rate.yaml

To add a view, write two functions and add one entry to ``VIEWS``:

- ``info(data: StudyData) -> ViewInfo``: pure, over the extracted data (no plotting, no store).
  It returns the answer as ``text``, the ``tables`` to print (also written as CSV) and, in
  ``plots``, the plain data its figures draw. Unit-test it on a literal StudyData
  (tests/test_report_views.py shows how).
- ``render(info: ViewInfo) -> list[(stem, caption, Figure)]``: matplotlib figures, object API
  only; import matplotlib inside the function (study validation imports this registry).
- ``metrics``: step metrics the view needs for *every* trial (complete, pruned and failed); the
  report fetches them into ``data.trial_histories`` (trial number -> frame with ``step``,
  ``epoch`` and one column per metric that trial logged). A name ending in "/" takes every
  metric with that prefix (``grad_norm/``: every layer).
- ``artifacts``: files the view needs from every *complete* trial's run (``examples.npz``,
  ``test_predictions.npy``, ``config.json``, ...); the report fetches them into
  ``data.trial_artifacts`` (trial number -> {file name: arrays, dict or frame}).

Files: tables ``<view>_<table>.csv``, figures ``<view>_<stem>.png`` (prefixed by the study key
when several studies are compared). A study's views reach the report through MLflow only: the
study run logs the study file as ``study.yaml``, whose ``report.views`` is read back here.
Unknown names are rejected when a study file is loaded (pipeline.search.studyfile); an old run
naming a view this version lacks gets a section saying so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pipeline import names
from pipeline.report.extract import StudyData, ViewInfo
from pipeline.report.views import data as vd, figures as vf, transfer as rt


@dataclass(frozen=True)
class View:
    """One registered view (see the module docstring)."""

    title: str
    info: Callable[[StudyData], ViewInfo]
    render: Callable[[ViewInfo], list]
    metrics: tuple[str, ...] = ()
    artifacts: tuple[str, ...] = ()


VIEWS: dict[str, View] = {
    "curves": View("Learning curves of every trial", vd.curves, vf.curves,
                   ("train_loss", "val_loss", "val_acc")),
    "overfitting": View("Training length and overfitting", vd.overfitting, vf.overfitting,
                        ("train_loss", "val_loss", "train_acc", "val_acc", "epoch_test_loss",
                         "epoch_test_acc")),
    "batch_size": View("Batch size: accuracy, time and noise", vd.batch_size, vf.batch_size,
                       ("train_loss", "train_loss_std", "epoch_seconds", "val_acc")),
    "width_depth": View("Width and depth", vd.width_depth, vf.width_depth,
                        ("val_acc", "grad_norm/")),
    "ablation": View("Training tricks, added one at a time", vd.ablation, vf.ablation,
                     ("train_loss", "val_acc")),
    "train_size": View("Training-set size and the generalisation gap", vd.train_size,
                       vf.train_size, ("train_acc", "val_acc")),
    "transfer": View("Transfer: scratch, linear probe or fine-tune", rt.transfer_info,
                     rt.transfer_render, artifacts=rt.ARTIFACTS),
}


def views_of(study_yaml: str) -> list[str]:
    """The view names a study file's text asks for (its ``report.views``)."""
    raw = yaml.safe_load(study_yaml) or {}
    report = raw.get("report") or {} if isinstance(raw, dict) else {}
    return [str(v) for v in report.get("views") or []]


def load_views(client, data: StudyData) -> None:
    """Read the study's views from its logged study file and fetch the histories they need."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(data.study_run_id, names.STUDY_FILE, tmp)
            text = Path(path).read_text()
        except Exception:  # a run logged before study files were: the standard report only
            return
    data.views = views_of(text)
    wanted = sorted({m for v in data.views if v in VIEWS for m in VIEWS[v].metrics})
    if wanted:
        data.trial_histories = fetch_histories(client, data.trials, wanted)
    files = sorted({f for v in data.views if v in VIEWS for f in VIEWS[v].artifacts})
    if files:
        data.trial_artifacts = fetch_artifacts(client, data.complete, files)


def fetch_artifacts(client, trials: pd.DataFrame, files: list[str]) -> dict[int, dict]:
    """The named files of each trial's run, loaded (no pickles): .npz as a dict of arrays,
    .npy as an array, .json as a dict, .csv as a frame; a file a run lacks is left out."""
    import json

    import numpy as np

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, run_id in zip(trials.number, trials.run_id):
            loaded, folder = {}, Path(tmp, run_id)
            folder.mkdir()
            for name in files:
                try:
                    path = Path(client.download_artifacts(run_id, name, str(folder)))
                except Exception:  # an older run, without this file
                    continue
                if name.endswith(".npz"):
                    with np.load(path, allow_pickle=False) as npz:
                        loaded[name] = {k: npz[k] for k in npz.files}
                elif name.endswith(".npy"):
                    loaded[name] = np.load(path, allow_pickle=False)
                elif name.endswith(".json"):
                    loaded[name] = json.loads(path.read_text())
                else:
                    loaded[name] = pd.read_csv(path)
            out[int(number)] = loaded
    return out


def fetch_histories(client, trials: pd.DataFrame, metrics: list[str]) -> dict[int, pd.DataFrame]:
    """Step metrics of every trial (one frame per trial number, one row per epoch)."""
    from pipeline.report.extract import metric_history

    prefixes = [m for m in metrics if m.endswith("/")]
    out = {}
    for number, run_id in zip(trials.number, trials.run_id):
        keys = ["epoch", *(m for m in metrics if not m.endswith("/"))]
        if prefixes:  # the layer names differ per trial: ask the run which it logged
            logged = client.get_run(run_id).data.metrics
            keys += sorted(k for k in logged if k.startswith(tuple(prefixes)))
        hist = metric_history(client, run_id, keys)
        out[int(number)] = hist.dropna(axis=1, how="all")  # metrics this trial never logged
    return out


def view_sections(data: StudyData, prefix: str = "") -> list:
    """One report Section per view the study asks for."""
    from pipeline.figures import to_png
    from pipeline.report.render import Section

    sections = []
    for name in data.views:
        view = VIEWS.get(name)
        if view is None:
            sections.append(Section(f"View {name}", f"This version has no report view {name!r} "
                                    f"(known: {', '.join(VIEWS)})."))
            continue
        info = view.info(data)
        sec = Section(view.title, info.text,
                      [(f"{prefix}{name}_{t}", df) for t, df in info.tables.items()])
        for stem, caption, fig in view.render(info):
            sec.figures.append((f"{prefix}{name}_{stem}.png", caption, to_png(fig)))
        sections.append(sec)
    return sections
