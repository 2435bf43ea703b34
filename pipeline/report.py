"""Report stage: comparison tables and plots of studies, read from the MLflow tracking store.

    python -m pipeline.report --study fine                  # reports/fine/ (with coarse beside it)
    python -m pipeline.report --study coarse --study fine   # reports/coarse-vs-fine/

Writes ``index.html`` (self-contained: opens from disk), ``report.md``, the figures as PNG and the
tables as CSV, replacing the folder atomically, and logs the folder as ``report/`` artifacts on the
study's MLflow run. Exit code 2: no such study, no trials, no completed trial, or no store.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline import gc_policy

EXIT_BAD_INPUT = 2


@dataclass
class Section:
    """A titled block of tables and figures; rendered to both HTML and Markdown."""

    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (file, caption, png)


def _importances(data) -> dict[str, float]:
    """fANOVA importance from the MLflow data alone (an in-memory Optuna study)."""
    import optuna

    from pipeline import space as space_mod

    dists = space_mod.distributions(space_mod.from_plain(data.space))
    trials = []
    for _, row in data.complete.iterrows():
        params = {n: row[n] for n in dists if n in row and pd.notna(row[n])}
        params = {n: (int(v) if isinstance(dists[n], optuna.distributions.IntDistribution) else
                      float(v) if isinstance(dists[n], optuna.distributions.FloatDistribution)
                      else v) for n, v in params.items()}
        if len(params) == len(dists):
            trials.append(optuna.trial.create_trial(
                params=params, distributions=dists, value=float(row.objective)))
    if len(trials) < 3 or not dists:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        study = optuna.create_study(direction=data.direction)
        study.add_trials(trials)
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # e.g. no variation in any parameter
        return {}
    finally:
        optuna.logging.set_verbosity(verbosity)


def baseline_row(examples: dict) -> dict:
    """A constant predictor (the training split's majority class), for scale."""
    majority = int(examples["train_counts"].argmax())
    return {"number": f"baseline: always predict class {examples['classes'][majority]}",
            "objective": float(examples["val_counts"][majority] / examples["val_counts"].sum()),
            "test_acc": float(examples["test_counts"][majority] / examples["test_counts"].sum()),
            "n_params": 0}


def _importance_figure(data):
    from pipeline import report_figures as rf

    return rf.importance(_importances(data), f"{data.key}: hyperparameter importance")


STUDY_FIGURES = ("history", "objective_vs_params", "pair", "parallel_coordinates", "importance",
                 "top_curves", "lr_schedule", "generalisation", "confusion", "misclassified",
                 "correct", "grad_norms")
_rendering = None  # the StudyData being rendered, inherited by forked workers


def _render_one(name: str) -> bytes:
    from pipeline import report_figures as rf
    from pipeline.figures import to_png

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
    from pipeline import report_data as rd, report_figures as rf

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
    head = Section(f"Study {data.key}", text, [
        (f"{prefix}summary", pd.DataFrame([summary]).T.rename(columns={0: "value"})),
        (f"{prefix}top_trials", top)])
    if data.narrowing:
        head.tables.append((f"{prefix}narrowing", rd.range_changes(data)))
    figs = Section(f"Figures: {data.key}")
    for name, png in render_figures(data).items():
        figs.figures.append((f"{prefix}{name}.png", rf.CAPTIONS[name], png))
    return [head, figs]


def comparison_section(datas) -> Section:
    from pipeline import report_data as rd, report_figures as rf
    from pipeline.figures import to_png

    sec = Section("Studies side by side",
                  "Best, quartiles and median of the objective over complete trials; trials "
                  "needed to reach each study's best; boundary flags.",
                  [("comparison", rd.compare_studies(datas))])
    sec.figures.append(("compare.png", rf.CAPTIONS["compare"], to_png(rf.compare_objectives(datas))))
    return sec


def build_sections(datas, parents) -> list[Section]:
    from pipeline.report_views import view_sections

    sections = []
    if len(datas) + len(parents) > 1:
        sections.append(comparison_section([*parents, *datas]))
    for d in datas:
        prefix = f"{d.key}_" if len(datas) > 1 else ""
        sections += study_sections(d, prefix)
        sections += view_sections(d, prefix)  # what the study file asks for (report_views)
    return sections


# -- rendering ----------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    index = df.index.name is not None or not isinstance(df.index, pd.RangeIndex)
    header = ([""] if index else []) + cols
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in df.iterrows():
        cells = ([str(idx)] if index else []) + [_fmt(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", "", s.text, ""] if s.text else [f"## {s.title}", ""]
        for name, df in s.tables:
            out += [f"**{name}** (`{name}.csv`)", "", markdown_table(df), ""]
        for file, caption, _ in s.figures:
            out += [f"![{file}]({file})", "", f"*{caption}*", ""]
    return "\n".join(out)


HTML_STYLE = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.85rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}th{background:#f3f3f3}
figure{margin:1.5rem 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-style:italic;margin-top:.3rem}"""


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        for name, df in s.tables:
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts.append(df.to_html(na_rep="", float_format=lambda v: f"{v:.4g}", border=0))
        for file, caption, png in s.figures:
            data = base64.b64encode(png).decode()
            parts.append(f"<figure><img alt='{html.escape(file)}' src='data:image/png;base64,"
                         f"{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, title: str, sections: list[Section]) -> Path:
    """Write the folder next to its final place, then swap it in: never half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for s in sections:
            for name, df in s.tables:
                df.to_csv(tmp / f"{name}.csv", index=not isinstance(df.index, pd.RangeIndex))
            for file, _, png in s.figures:
                (tmp / file).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(title, sections))
        (tmp / "index.html").write_text(render_html(title, sections))
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except BaseException:
            if old is not None and not out_dir.exists():
                old.rename(out_dir)  # put the previous report back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def make_report(client, keys: Sequence[str], out_root: Path, log: bool = True) -> Path:
    """Extract, render, write and (optionally) log the report; returns its folder."""
    from pipeline import report_data as rd, tracking
    from pipeline.report_views import load_views

    datas = [rd.extract_study(client, k) for k in keys]
    for d in datas:
        load_views(client, d)
    parents = []
    for d in datas:
        parent = d.study_params.get("study.parent")
        if parent and parent not in keys and parent not in [p.key for p in parents]:
            try:
                parents.append(rd.extract_study(client, parent, top_n=1))
            except rd.ReportError:
                pass  # the parent's runs were deleted: report the child alone
    name = keys[0] if len(keys) == 1 else "-vs-".join(keys)
    title = f"Study report: {name}"
    out = write_report(Path(out_root) / name, title, build_sections(datas, parents))
    if log:
        client.log_artifacts(datas[-1].study_run_id, str(out), "report")
        tracking.set_tags(client, datas[-1].study_run_id, {"pipeline.report": str(out.resolve())})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    p.add_argument("--study", action="append", required=True,
                   help="study name (repeat to compare studies)")
    p.add_argument("--out", default="reports", help="output root (default: reports/)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    args = p.parse_args(argv)
    from pipeline import tracking
    from pipeline.report_data import ReportError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    keys = [k.strip() for k in args.study if k.strip()]
    try:
        client = tracking.tracking_client()
        tracking.check_store(client)
        out = make_report(client, keys, Path(args.out), log=not args.no_log)
    except (ReportError, tracking.TrackingUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the previous report, if any, is unchanged", file=sys.stderr)
        return 130
    print(f"report written to {out}/index.html (and report.md)")
    return 0


if __name__ == "__main__":
    gc_policy.pause()  # until the figures are drawn (gc_policy.py)
    raise SystemExit(main())
