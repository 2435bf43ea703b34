"""Study orchestration: check everything, create or resume the study, run workers, summarise.

Order matters for "nothing half-created": every check (study file, parent, storage, dataset,
tracking store) runs before the Optuna study or any MLflow run is created.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna

from pipeline import names
from pipeline.cli import EXIT_FAILED
from pipeline.config import ConfigError
from pipeline.search import (
    create,
    narrow,
    objective,
    recheck,
    storage as storage_mod,
    transfer,
    winner,
)
from pipeline.search.close import close_study_run, print_summary
from pipeline.search.plan import (
    ON_BEHALF,
    Plan,
    nothing_to_recheck,
    plan_study,
    source_opts,
    studies_folder,
)
from pipeline.search.processes import fork_pool, run_workers
from pipeline.search.summary import summarize
from pipeline.search.worker import fail_stale
from pipeline.tracking import client as tracking, context, spool
from pipeline.tracking.writer import QueuedClient
from pipeline.training.data import DatasetNotFound, load_splits

BAD_INPUT = (ConfigError, storage_mod.StorageError, DatasetNotFound,
             tracking.TrackingUnavailable, narrow.NarrowingError)



def _resolve_source(plan: Plan, opts, client):
    """The source's winner and its cached weights; in smoke mode the source runs first (in
    smoke mode too) when it has none, as a parent does."""
    from pipeline.training.data import cache_dir

    how = f"python -m pipeline.search --study {plan.cfg.source}" + (
        " --smoke --dataset digits" if opts.smoke else "")
    folder = cache_dir() / "checkpoints"
    try:
        return transfer.resolve_source(client, plan.source_key, how, folder)
    except winner.NoWinner:
        if not opts.smoke:
            raise
    print(f"[{plan.key}] source {plan.source_key} has no completed trial: running it in smoke "
          "mode first")
    run_study(source_opts(opts, plan.cfg))
    return transfer.resolve_source(client, plan.source_key, how, folder)


def run_study(opts) -> int:
    """Check, create or resume, run, summarise. Returns the exit code."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    plan = plan_study(opts)  # a re-check alone: cli.run checked it has something to re-check
    if (plan.parent_key and not opts.smoke and plan.storage.path
            and not Path(plan.storage.path).exists()):
        raise narrow.NarrowingError(create.run_parent_first(plan))
    fixed = plan.cfg.fixed
    pool = fork_pool(opts.workers, lambda: load_splits(
        plan.cfg.dataset, fixed.get("data_dir"), fixed.get("data_seed", 0),
        fixed.get("val_fraction", 0.2), fixed.get("n_per_class")))
    try:
        return _run_study(opts, plan, pool)
    finally:
        if pool is not None:
            pool.close()


def _run_study(opts, plan: Plan, pool) -> int:
    """run_study once the dataset is loaded and the helpers forked."""
    store_exists = tracking.check_uri()  # creates no store file: a later check may still fail
    client = source = None
    if plan.source_key:  # the source's winner, before the Optuna storage is created
        if not store_exists and not opts.smoke:
            raise winner.NoWinner(
                f"study {plan.source_key!r} has no finished run with a completed trial: the "
                "MLflow tracking store does not exist yet. Run it first: python -m "
                f"pipeline.search --study {plan.cfg.source}")
        client = spool.SpoolingClient(tracking.tracking_client())
        source = _resolve_source(plan, opts, client)
    storage = storage_mod.open_storage(plan.storage)
    if plan.recheck_only and not create.has_completed_trials(storage, plan.key):
        raise ConfigError(nothing_to_recheck(plan))
    narrowing = None
    if plan.parent_key and not create.study_exists(storage, plan.key):
        if opts.smoke and not create.has_completed_trials(storage, plan.parent_key):
            # A smoke check of a chain runs its parents in smoke mode first.
            print(f"[{plan.key}] parent {plan.parent_key} has no completed trial: "
                  "running it in smoke mode first")
            run_study(replace(opts, study=plan.cfg.parent, n_trials=None,
                              studies_dir=studies_folder(opts), **ON_BEHALF))
        narrowing = create.narrow_from_parent(plan, storage)
    client = client or spool.SpoolingClient(tracking.tracking_client())
    # Every check has passed: the trials' MLflow writer starts now, so that its start-up
    # (importing MLflow, about a second) overlaps the study's setup rather than its first trials.
    writer = QueuedClient(client)  # this process is the first worker (processes.py)
    try:
        return _run_checked(opts, plan, storage, narrowing, client, source, writer, pool)
    finally:
        writer.close()


def _run_checked(opts, plan: Plan, storage, narrowing, client, source, writer, pool) -> int:
    """run_study after every check: create or resume the study and its run, run the trials."""
    study, search_space = create.create_or_load(plan, storage, narrowing)
    fail_stale(study, plan, client)
    experiment_id = context.resolve_experiment(client, opts.experiment, plan.cfg.dataset)
    run_id = create.start_study_run(client, experiment_id, plan, study, search_space)
    if source is not None:
        tracking.set_tags(client, run_id, {names.SOURCE_STUDY: source.study_key,
                                           names.SOURCE_RUN: source.trial_run_id})
    ctx = objective.TrialContext(plan.cfg, plan.key, search_space, experiment_id, run_id, plan.seed,
                                 source)
    status, started, stage = "KILLED", time.time(), None
    try:
        try:
            # A re-check alone (python -m pipeline.recheck) runs no search trial.
            broken = not plan.recheck_only and run_workers(opts, plan, ctx, study, client,
                                                           writer, pool)
            if not broken and plan.cfg.recheck:
                stage = recheck.prepare(plan, storage, study, ctx)
            if stage is not None:
                print(f"[{plan.key}] re-check: the {len(stage.ctx.candidates)} best trials, "
                      f"{stage.ctx.seeds} fresh seeds each ({stage.plan.key})", flush=True)
                broken = run_workers(opts, stage.plan, stage.ctx, stage.study, client, writer, pool)
        except (tracking.TrackingUnavailable, spool.TrackingLost) as err:  # not bad input now
            raise spool.TrackingLost(f"[{plan.key}] {err}".replace(
                "--study NAME", f"--study {plan.key}")) from None
        summary = summarize(study.get_trials(deepcopy=False), plan.cfg.objective.direction)
        # A study that keeps failing, or has nothing to show, is a failed execution.
        broken = broken or (summary["n_complete"] == 0 and summary["n_failed"] > 0)
        status = "FAILED" if broken else "FINISHED"
    finally:
        close_study_run(client, run_id, plan, study, status, started, stage)
    print_summary(plan, summary, stage and stage.verdict(study.get_trials(deepcopy=False)))
    print(f"[{plan.key}] runs in MLflow: "
          f"{context.runs_link(client.tracking_uri, experiment_id)}")
    if broken:
        print(f"[{plan.key}] failed: see the failed trials' error.txt in mlflow ui",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


