"""``--workers K``: K spawned worker processes on this machine, sharing the study and its run."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

import optuna

from pipeline import gc_policy, interrupt
from pipeline.cli import EXIT_STOPPED_ON_FAILURES, EXIT_TRACKING_LOST
from pipeline.search import storage as storage_mod
from pipeline.search.create import max_epochs
from pipeline.search.plan import Plan, plan_study
from pipeline.search.samplers import make_pruner, make_sampler
from pipeline.search.worker import run_worker
from pipeline.tracking import client as tracking, spool


def worker_process(opts, ctx) -> None:
    """Entry point of a worker process (spawned): its own storage and tracking connections."""
    import torch

    gc_policy.pause()  # until its loop starts (gc_policy.py)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # K workers share the machine's cores: without this each starts one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    plan = ctx.plan_of(plan_study(opts))  # the search's plan, or its re-check's
    storage = storage_mod.open_storage(plan.storage)
    study = optuna.load_study(study_name=plan.key, storage=storage,
                              sampler=make_sampler(plan.cfg.sampler.name, plan.seed,
                                                   plan.cfg.sampler.options, ctx.space),
                              pruner=make_pruner(plan.cfg.pruner.name, plan.cfg.pruner.options,
                                                 max_epochs(plan.cfg, ctx.space)))
    # Ctrl-C reaches the whole process group: the launcher alone handles it, and stops the
    # workers with SIGTERM (so one signal, not two, reaches each worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.stop_on_signals((signal.SIGTERM,)):
            client = spool.SpoolingClient(tracking.tracking_client())
            if run_worker(ctx, study, plan, client, quiet=True):
                raise SystemExit(EXIT_STOPPED_ON_FAILURES)
    except interrupt.Terminated as err:
        raise SystemExit(interrupt.exit_code(err)) from None
    except (tracking.TrackingUnavailable, spool.TrackingLost) as err:
        print(f"[{plan.key}] {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_TRACKING_LOST) from None


def run_processes(opts, plan: Plan, ctx) -> bool:
    """Run K worker processes; True when one stopped because trials kept failing."""
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=worker_process, args=(opts, ctx), name=f"worker-{i}")
             for i in range(opts.workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        raise
    if lost := [p.name for p in procs if p.exitcode == EXIT_TRACKING_LOST]:
        raise spool.TrackingLost(f"{', '.join(lost)} lost the MLflow tracking store (see above)")
    bad = [p.name for p in procs if p.exitcode not in (0, EXIT_STOPPED_ON_FAILURES)]
    if bad:
        print(f"[{plan.key}] warning: {', '.join(bad)} exited abnormally")
    return any(p.exitcode == EXIT_STOPPED_ON_FAILURES for p in procs)
