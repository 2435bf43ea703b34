"""Run a study: an Optuna search whose every trial is an MLflow child run of the study's run.

    python -m pipeline.search --study coarse            # studies/coarse.yaml
    python -m pipeline.search --study fine              # narrowed from coarse's best trials
    python -m pipeline.search --study coarse --smoke    # a few tiny trials, to check a study
    python -m pipeline.search --study coarse --workers 1 --n-trials 40

Re-running a study resumes it: ``n_trials`` counts the study's trials in total. Exit codes: 0 done,
1 failed (trials kept failing, or the tracking store went away: see pipeline.tracking.spool), 2
bad input (study file, flags, storage, dataset, tracking store), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    WORKERS_HELP,
    Parser,
    str_or_none,
    whole_or_none,
    workers,
)
from pipeline.search.studyfile import SMOKE_TRIALS


@dataclass(frozen=True)
class SearchOptions:
    """The command line, resolved; passed as is to worker processes."""

    study: str
    n_trials: int | None = None
    dataset: str | None = None
    storage: str | None = None
    seed: int | None = None
    workers: int | None = 1  # None: auto (pipeline.search.processes.worker_count)
    smoke: bool = False
    experiment: str | None = None
    studies_dir: str | None = None
    quiet: bool = False
    recheck_top_k: int | None = None  # override the study file's recheck (python -m ...recheck)
    recheck_seeds: int | None = None
    recheck_only: bool = False  # re-check the finished study; run no search trial


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m pipeline.search", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study name under studies/, or a YAML path")
    # Empty values mean "not given": MLproject parameters default to "" for these.
    p.add_argument("--n-trials", type=whole_or_none, default=None,
                   help="total trials of the study (default: the study file's n_trials)")
    p.add_argument("--dataset", type=str_or_none, default=None,
                   help="override the study's dataset")
    p.add_argument("--storage", type=str_or_none, default=None,
                   help="Optuna storage (default: OPTUNA_STORAGE, else ./optuna.journal)")
    p.add_argument("--seed", type=whole_or_none, default=None, help="override the sampler seed")
    p.add_argument("--workers", type=workers, default="", help=WORKERS_HELP)
    p.add_argument("--smoke", action="store_true",
                   help=f"{SMOKE_TRIALS} tiny trials in a separate '-smoke' study")
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = []
    if args.n_trials is not None and args.n_trials < 1:
        problems.append(f"--n-trials must be at least 1 (got {args.n_trials})")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(SearchOptions(**{k: v for k, v in vars(args).items()}))


def run(opts: SearchOptions) -> int:
    """Run a study (or its re-check alone) and turn what can go wrong into an exit code."""
    from pipeline.config import ConfigError
    from pipeline.search.studyfile import load_study

    try:  # a wrong study file is told in a fraction of a second, before torch and MLflow load
        load_study(opts.study)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from pipeline.search import storage
    from pipeline.search.plan import check_recheck_only, plan_study

    try:  # and so is a wrong flag (--dataset, --storage), or a re-check of a study never run
        plan = plan_study(opts)
        if plan.recheck_only:
            check_recheck_only(plan)
    except (ConfigError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from pipeline import interrupt
    from pipeline.search import engine  # heavy imports only once the input is sound
    from pipeline.tracking import spool

    try:
        with interrupt.stop_on_signals():  # SIGTERM too ends the running trial cleanly
            return engine.run_study(opts)
    except engine.BAD_INPUT as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except spool.TrackingLost as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, interrupt.Terminated) as err:
        print(f"{str(err) or 'interrupted'}: the running trial was marked failed and its run "
              "KILLED; run the same command again to continue.", file=sys.stderr)
        return interrupt.exit_code(err)

