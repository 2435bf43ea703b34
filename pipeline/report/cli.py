"""Report stage: comparison tables and plots of studies, read from the MLflow tracking store.

    python -m pipeline.report --study fine                  # reports/fine/ (with coarse beside it)
    python -m pipeline.report --study coarse --study fine   # reports/coarse-vs-fine/

Writes ``index.html`` (self-contained: opens from disk), ``report.md``, the figures as PNG and the
tables as CSV, replacing the folder atomically, and logs the folder as ``report/`` artifacts on the
study's MLflow run. Exit code 2: no such study, no trials, no completed trial, or no store.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.report",
                                description=__doc__.split("\n")[0])
    p.add_argument("--study", action="append", required=True,
                   help="study name (repeat to compare studies)")
    p.add_argument("--out", default="reports", help="output root (default: reports/)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    args = p.parse_args(argv)
    from pipeline.report.build import make_report
    from pipeline.report.extract import ReportError
    from pipeline.tracking import client as tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    keys = [k.strip() for k in args.study if k.strip()]
    if not keys:
        print("error: --study: give a study name (see python -m pipeline.report -h)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:  # a store that does not exist is not created: it holds no study to report
        client = tracking.reading_client("Run the study first: python -m pipeline.search "
                                         f"--study {keys[0]}")
        out = make_report(client, keys, Path(args.out), log=not args.no_log)
    except (ReportError, tracking.TrackingUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the previous report, if any, is unchanged", file=sys.stderr)
        return 130
    print(f"report written to {out}/index.html (and report.md)")
    return 0

