"""``--workers``: this process is the study's first worker; the others are forked from it.

``--workers auto`` (the default) means one worker per usable core, each with its share of the
cores' threads, and never more workers than trials left. A worker started from scratch pays a
start-up (a Python process importing torch, Optuna and MLflow and loading the dataset: several
seconds of one core), which on a study of short trials cost more than the second worker gained.
So the launcher forks its helpers (`Pool`) as soon as it has imported everything and loaded the
dataset, and before it opens a store or starts a thread (what a fork must not copy): a helper
then costs a fork, and its imports and the dataset are shared with the launcher. The helpers
wait until the launcher has checked everything and created or resumed the study, then run
trials beside the launcher's own worker; a re-check stage reuses them.

Every worker claims trials under the study lock (worker.claim_trial), so the study still makes
exactly ``n_trials`` trials. Which worker runs which trial, and so what a sampler that learns
from finished trials (TPE, GP) proposes and what a pruner compares with, depends on the order
trials finish: only ``--workers 1`` reproduces a study exactly from its seed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from dataclasses import replace

import optuna

from pipeline import interrupt
from pipeline.cli import EXIT_OK, EXIT_STOPPED_ON_FAILURES, EXIT_TRACKING_LOST
from pipeline.search import storage as storage_mod
from pipeline.search.create import max_epochs
from pipeline.search.plan import Plan, plan_study
from pipeline.search.samplers import make_pruner, make_sampler
from pipeline.search.summary import budget_spent
from pipeline.search.worker import run_worker
from pipeline.tracking import client as tracking, spool
from pipeline.tracking.writer import QueuedClient


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int | None, trials_left: int) -> int:
    """Workers for ``trials_left`` trials: ``requested``, or one per usable core (None: auto);
    never more than there are trials to run."""
    return max(1, min(requested or usable_cores(), trials_left))


def threads_per_worker(workers: int) -> int:
    """K workers share the machine's cores: without this each starts one thread per core."""
    return max(1, usable_cores() // workers)


def trials_left(study, plan: Plan) -> int:
    """Trials still to claim before the budget is spent (failed ones are replaced)."""
    trials = study.get_trials(deepcopy=False)
    if budget_spent(trials, plan.n_trials):
        return 0
    counted = sum(t.state != optuna.trial.TrialState.FAIL for t in trials)
    return max(1, plan.n_trials - counted)


def run_workers(opts, plan: Plan, ctx, study, client, writer, pool: Pool | None) -> bool:
    """Run the trials of ``plan`` here and on the pool's helpers; True when a worker stopped
    because trials kept failing."""
    import torch

    k = min(worker_count(opts.workers, trials_left(study, plan)), 1 + (pool.alive() if pool else 0))
    if k == 1:
        return run_worker(ctx, study, plan, client, quiet=opts.quiet, writer=writer)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker(k))
    try:
        pool.start(k - 1, replace(opts, workers=k), ctx)
        # Ctrl-C or SIGTERM: passed on to the helpers before this worker ends its own trial
        # (which waits for its MLflow writer), so that all of them stop together.
        with interrupt.first_call(pool.terminate):
            # Quiet: a line per trial from every worker, not a bar that counts this one's.
            broken = run_worker(ctx, study, plan, client, quiet=True, writer=writer)
        return pool.wait() or broken
    except BaseException:
        pool.stop()
        raise
    finally:
        torch.set_num_threads(threads)


class Pool:
    """Helper workers forked from the launcher (see the module doc). Each waits for a job
    (the options and trial context of a stage), runs a worker loop on it, answers its exit
    code, and waits for the next; it exits when the launcher closes the pool or dies."""

    def __init__(self, n: int):
        mp = multiprocessing.get_context("fork")
        self._helpers = []
        for i in range(n):
            ours, theirs = mp.Pipe()
            # The helper closes the launcher's ends it inherited (its own pipe's and the earlier
            # helpers'), so that it reads end-of-file once the launcher closes or dies.
            inherited = [ours, *(conn for _, conn in self._helpers)]
            proc = mp.Process(target=_serve, args=(theirs, inherited), name=f"worker-{i + 2}")
            proc.start()
            theirs.close()
            self._helpers.append((proc, ours))
        self._busy: list = []
        self._terminated = False

    def alive(self) -> int:
        return sum(proc.is_alive() for proc, _ in self._helpers)

    def start(self, n: int, opts, ctx) -> None:
        self._busy = [(proc, conn) for proc, conn in self._helpers if proc.is_alive()][:n]
        for _, conn in self._busy:
            conn.send((opts, ctx))

    def wait(self) -> bool:
        """Wait for the running jobs; True when a helper stopped because trials kept failing."""
        codes = {}
        for proc, conn in self._busy:
            try:
                codes[proc.name] = conn.recv()
            except EOFError:  # it died (killed): its trial is failed and rerun (stale.py)
                proc.join(5)
                codes[proc.name] = proc.exitcode
        self._busy = []
        if lost := [name for name, code in codes.items() if code == EXIT_TRACKING_LOST]:
            raise spool.TrackingLost(f"{', '.join(lost)} lost the MLflow tracking store (see "
                                     "above)")
        if bad := [name for name, code in codes.items()
                   if code not in (EXIT_OK, EXIT_STOPPED_ON_FAILURES)]:
            print(f"warning: {', '.join(bad)} exited abnormally", flush=True)
        return EXIT_STOPPED_ON_FAILURES in codes.values()

    def terminate(self) -> None:
        """SIGTERM to the running helpers, once: it fails their running trials and KILLs their
        runs (a second SIGTERM would kill a helper outright, mid-clean-up)."""
        if not self._terminated:
            self._terminated = True
            for proc, _ in self._busy:
                if proc.is_alive():
                    proc.terminate()

    def stop(self) -> None:
        """The launcher was stopped (Ctrl-C, SIGTERM, an error): so are the helpers."""
        self.terminate()
        self.close()

    def close(self) -> None:
        for _, conn in self._helpers:
            conn.close()  # a waiting helper reads end-of-file and exits
        for proc, _ in self._helpers:
            proc.join()
        self._helpers = []


def fork_pool(requested: int | None, load_dataset) -> Pool | None:
    """Load the dataset, then fork the helpers a study may use (one fewer than the workers it
    may run). Called before any store is opened or thread started. The dataset is loaded with
    one thread: a process that ran a multi-threaded OpenMP region cannot fork a child that
    runs one (GNU OpenMP hangs in the child)."""
    import torch

    helpers = (requested or usable_cores()) - 1
    if helpers < 1:
        load_dataset()
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_dataset()
    finally:
        torch.set_num_threads(threads)
    return Pool(helpers)


def _serve(conn, inherited) -> None:
    """A helper: run each job the launcher sends, answer its exit code."""
    for end in inherited:
        end.close()
    # Ctrl-C reaches the whole process group: the launcher alone handles it, and stops the
    # helpers with SIGTERM (so one signal, not two, reaches each worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the launcher's handler; a job's own
    tracking.forget_inherited_connections()  # none, from a command; a caller's, in-process
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    client = writer = None
    try:
        while True:
            try:
                opts, ctx = conn.recv()
            except (EOFError, OSError):  # the pool was closed, or the launcher died
                return
            if writer is None:  # MLflow's own process, started once every check has passed
                client = spool.SpoolingClient(tracking.tracking_client())
                writer = QueuedClient(client)
            code = _job(opts, ctx, client, writer)
            try:
                conn.send(code)
            except OSError:  # the launcher stopped and closed the pool meanwhile
                return
            if code != EXIT_OK:
                return
    finally:
        if writer is not None:
            writer.close()


def _job(opts, ctx, client, writer) -> int:
    """One stage's worker loop in a helper; its exit code."""
    import torch

    torch.set_num_threads(threads_per_worker(opts.workers))
    plan = ctx.plan_of(plan_study(opts))  # the search's plan, or its re-check's
    try:
        with interrupt.stop_on_signals((signal.SIGTERM,)):
            study = optuna.load_study(
                study_name=plan.key, storage=storage_mod.open_storage(plan.storage),
                sampler=make_sampler(plan.cfg.sampler.name, plan.seed, plan.cfg.sampler.options,
                                     ctx.space),
                pruner=make_pruner(plan.cfg.pruner.name, plan.cfg.pruner.options,
                                   max_epochs(plan.cfg, ctx.space)))
            broken = run_worker(ctx, study, plan, client, quiet=True, writer=writer)
            return EXIT_STOPPED_ON_FAILURES if broken else EXIT_OK
    except interrupt.Terminated as err:
        return interrupt.exit_code(err)
    except (tracking.TrackingUnavailable, spool.TrackingLost) as err:
        print(f"[{plan.key}] {err}", file=sys.stderr, flush=True)
        return EXIT_TRACKING_LOST
