"""Build a report: extract each study, draw its figures, assemble the sections, write and log."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from pipeline import gc_policy, names
from pipeline.config import describe_fidelity
from pipeline.report.render import Section, write_report

MIN_IMPORTANCE_TRIALS = 3


@dataclass
class Importance:
    """Hyperparameter importance as the report computed it, and what it could not use."""

    values: dict[str, float]  # parameter -> share (fANOVA, normalised), most important first
    used: list[int]  # the complete trials it was computed from (trial numbers)
    left_out: dict[int, str]  # complete trials it could not use -> why
    reason: str = ""  # why there are no values, when there are none

    def note(self) -> str:
        """One sentence for the report: from how many trials, what was left out and why."""
        n = len(self.used) + len(self.left_out)
        text = (f"Importance (fANOVA) computed from {len(self.used)} of {n} complete trials"
                if self.values else f"Importance not computed: {self.reason}")
        if self.left_out:
            text += "; left out: " + "; ".join(f"trial {k} ({why})"
                                               for k, why in sorted(self.left_out.items()))
        return text + "."


def _unusable(spec: dict, value) -> str | None:
    """Why a logged value cannot stand for a trial of ``spec``'s parameter, or None."""
    if spec["type"] in ("categorical", "bundle"):
        return None if value in list(spec["choices"]) else "not one of the choices"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "not a number"
    if spec["type"] == "int" and number != int(number):
        return "not an integer"
    if not spec["low"] <= number <= spec["high"]:
        return f"outside [{spec['low']:g}, {spec['high']:g}]"
    return None


def importance(data) -> Importance:
    """fANOVA importance from the MLflow data alone (an in-memory Optuna study), over every
    complete trial; a trial it cannot use, and a failure to compute, are said, not hidden.
    Computed once per StudyData (before the figure workers fork, which then share it)."""
    if data.importance is None:
        data.importance = _compute_importance(data)
    return data.importance


def _compute_importance(data) -> Importance:
    import optuna

    from pipeline.search import space as space_mod

    dists = space_mod.distributions(space_mod.from_plain(data.space))
    trials, used, left_out = [], [], {}
    for _, row in data.complete.iterrows():
        number = int(row.number)
        logged = {n: None if n not in row or pd.isna(row[n]) else row[n] for n in dists}
        missing = [n for n, v in logged.items()  # None stands for itself where it is a choice
                   if v is None and not (data.space[n]["type"] in ("categorical", "bundle")
                                         and None in list(data.space[n]["choices"]))]
        if missing:
            left_out[number] = f"no value for {', '.join(missing)}"
            continue
        bad = {n: why for n, v in logged.items() if (why := _unusable(data.space[n], v))}
        if bad:
            left_out[number] = ", ".join(f"{n}={logged[n]!r} {why}" for n, why in bad.items())
            continue
        value = float(row.objective) if pd.notna(row.objective) else math.nan
        if not math.isfinite(value):
            left_out[number] = f"objective {value}"
            continue
        params = {n: (int(v) if isinstance(dists[n], optuna.distributions.IntDistribution) else
                      float(v) if isinstance(dists[n], optuna.distributions.FloatDistribution)
                      else v) for n, v in logged.items()}
        try:
            trials.append(optuna.trial.create_trial(params=params, distributions=dists,
                                                    value=value))
        except ValueError as e:  # e.g. off the step of a stepped range
            left_out[number] = str(e)
            continue
        used.append(number)
    if not dists:
        return Importance({}, [], left_out, "no parameter was searched")
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        return Importance({}, used, left_out, f"{len(trials)} usable complete trial(s), at "
                                              f"least {MIN_IMPORTANCE_TRIALS} needed")
    if len({t.value for t in trials}) == 1:  # fANOVA would share out rounding noise
        return Importance({}, used, left_out, "the objective has the same value in every trial")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        study = optuna.create_study(direction=data.direction)
        study.add_trials(trials)
        # fANOVA by name (Optuna's default evaluator is another one), seeded: the same report
        # twice shows the same numbers.
        raw = optuna.importance.FanovaImportanceEvaluator(seed=0).evaluate(study)
    except (RuntimeError, ValueError) as e:  # e.g. zero variance in all of fANOVA's trees
        return Importance({}, used, left_out, f"Optuna could not evaluate it ({e})")
    finally:
        optuna.logging.set_verbosity(verbosity)
    total = float(sum(raw.values()))
    if not total > 0 or not math.isfinite(total):
        return Importance({}, used, left_out, "no parameter explains any of the objective's "
                                              "variance")
    values = {n: float(v) / total for n, v in sorted(raw.items(), key=lambda kv: -kv[1])}
    return Importance(values, used, left_out)


def importance_table(imp: Importance) -> pd.DataFrame:
    return pd.DataFrame({"param": list(imp.values), "importance": list(imp.values.values())})


def baseline_row(examples: dict) -> dict:
    """A constant predictor (the training split's majority class), for scale."""
    majority = int(examples["train_counts"].argmax())
    return {"number": f"baseline: always predict class {examples['classes'][majority]}",
            "objective": float(examples["val_counts"][majority] / examples["val_counts"].sum()),
            "test_acc": float(examples["test_counts"][majority] / examples["test_counts"].sum()),
            "n_params": 0}


def _importance_figure(data):
    from pipeline.report import figures as rf

    imp = importance(data)
    return rf.importance(imp.values, f"{data.key}: hyperparameter importance",
                         empty=f"not computed: {imp.reason}")


STUDY_FIGURES = ("history", "objective_vs_params", "pair", "parallel_coordinates", "importance",
                 "top_curves", "lr_schedule", "generalisation", "confusion", "misclassified",
                 "correct", "grad_norms")
_rendering = None  # the StudyData being rendered, inherited by forked workers


def _render_one(name: str) -> bytes:
    from pipeline.figures import to_png
    from pipeline.report import figures as rf

    build = _importance_figure if name == "importance" else getattr(rf, name)
    return to_png(build(_rendering))


def render_figures(data) -> dict[str, bytes]:
    """Every figure of a study as PNG bytes. The figures are independent, so with several cores
    they are drawn by forked workers (which inherit ``data``: nothing is pickled but the PNGs)."""
    global _rendering
    _rendering = data
    workers = min(len(STUDY_FIGURES), os.cpu_count() or 1)
    gc_policy.resume_frozen()  # before forking: the workers inherit what is frozen
    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                return dict(zip(STUDY_FIGURES, pool.map(_render_one, STUDY_FIGURES)))
        return {name: _render_one(name) for name in STUDY_FIGURES}
    finally:
        _rendering = None


def study_sections(data, prefix: str) -> list[Section]:
    from pipeline.report import extract as rd, figures as rf

    summary = rd.summary_table(data)
    top = rd.top_trials(data)
    if "examples" in data.best_artifacts:
        top = pd.concat([top, pd.DataFrame([baseline_row(data.best_artifacts["examples"])])],
                        ignore_index=True)
    flags = rd.boundary_flags(data)
    text = (f"Objective: {data.metric} ({data.direction}), the best epoch of each trial on the "
            "validation split; test accuracy is shown for reporting, never used to select.")
    if flags:
        text += " Boundary flags: " + ", ".join(f"{k} near the {v} edge" for k, v in flags.items())
    if fid := (data.narrowing or {}).get("fidelity"):
        text += (f" Narrowed from {data.narrowing.get('parent')}, which trained on "
                 f"{describe_fidelity(fid['parent'])}; this study trains on "
                 f"{describe_fidelity(fid['this'])}.")
    imp = importance(data)
    text += " " + imp.note()
    head = Section(f"Study {data.key}", text, [
        (f"{prefix}summary", pd.DataFrame([summary]).T.rename(columns={0: "value"})),
        (f"{prefix}top_trials", top)])
    if data.narrowing:
        head.tables.append((f"{prefix}narrowing", rd.range_changes(data)))
    if imp.values:
        head.tables.append((f"{prefix}importance", importance_table(imp)))
    figs = Section(f"Figures: {data.key}")
    for name, png in render_figures(data).items():
        figs.figures.append((f"{prefix}{name}.png", rf.CAPTIONS[name], png))
    return [head, figs]


def comparison_section(datas) -> Section:
    from pipeline.figures import to_png
    from pipeline.report import extract as rd, figures as rf

    sec = Section("Studies side by side",
                  "Best, quartiles and median of the objective over complete trials; trials "
                  "needed to reach each study's best; boundary flags.",
                  [("comparison", rd.compare_studies(datas))])
    sec.figures.append(("compare.png", rf.CAPTIONS["compare"],
                        to_png(rf.compare_objectives(datas))))
    return sec


def headlines(sections: list[Section]) -> int:
    """How many sections open the report with its answers (headline.py's, first by design);
    the contents list comes after them, before the evidence."""
    return sum(s.title.startswith("Headline") for s in sections)


def build_sections(datas, parents) -> list[Section]:
    from pipeline.report.headline import headline_section
    from pipeline.report.views.registry import view_sections

    sections = []
    if len(datas) + len(parents) > 1:
        sections.append(comparison_section([*parents, *datas]))
    for d in datas:
        prefix = f"{d.key}_" if len(datas) > 1 else ""
        sections.insert(headlines(sections),
                        headline_section(d, prefix))  # the answers first, then the evidence
        sections += study_sections(d, prefix)
        sections += view_sections(d, prefix)  # what the study file asks for (report_views)
    return sections


def report_title(datas, made: datetime | None = None) -> str:
    """The studies, their dataset and when the report was made (UTC, to the minute)."""
    made = (made or datetime.now(UTC)).astimezone(UTC)
    datasets = [x for x in dict.fromkeys(d.study_params.get("study.dataset") for d in datas) if x]
    on = f" on {', '.join(datasets)}" if datasets else ""
    return (f"Study report: {' vs '.join(d.key for d in datas)}{on}, "
            f"{made:%Y-%m-%d %H:%M} UTC")


def make_report(client, keys: Sequence[str], out_root: Path, log: bool = True,
                made: datetime | None = None) -> Path:
    """Extract, render, write and (optionally) log the report; returns its folder. ``made``:
    the date in its title (default: now)."""
    from pipeline.report import extract as rd
    from pipeline.report.headline import load_recheck
    from pipeline.report.views.registry import load_views
    from pipeline.tracking import client as tracking

    datas = [rd.extract_study(client, k) for k in keys]
    for d in datas:
        load_views(client, d)
        load_recheck(client, d)
    parents = []
    for d in datas:
        parent = d.study_params.get("study.parent")
        if parent and parent not in keys and parent not in [p.key for p in parents]:
            try:
                parents.append(rd.extract_study(client, parent, top_n=1))
            except rd.ReportError:
                pass  # the parent's runs were deleted: report the child alone
    name = keys[0] if len(keys) == 1 else "-vs-".join(keys)
    sections = build_sections(datas, parents)
    out = write_report(Path(out_root) / name, report_title(datas, made), sections,
                       headlines(sections))
    if log:
        client.log_artifacts(datas[-1].study_run_id, str(out), "report")
        tracking.set_tags(client, datas[-1].study_run_id, {names.REPORT: str(out.resolve())})
        if env_run := os.environ.get("MLFLOW_RUN_ID"):
            # Under `mlflow run . -e report`, MLflow made a run for this command: it holds the
            # report too, and points at the study run it reports on.
            client.log_artifacts(env_run, str(out), "report")
            tracking.set_tags(client, env_run, {
                names.KIND: names.KIND_REPORT, names.STUDY: ",".join(keys),
                names.STUDY_RUN: datas[-1].study_run_id, names.REPORT: str(out.resolve())})
    return out
