"""The worker loop: claim a trial within the budget (atomically across processes), run it, tell
Optuna, and repeat; trials a dead worker left RUNNING are failed and requeued on the way."""

from __future__ import annotations

import contextlib
import time
import warnings

from optuna.trial import TrialState

from pipeline import gc_policy, interrupt
from pipeline.search import liveness, stale, storage as storage_mod
from pipeline.search.plan import Plan
from pipeline.search.samplers import make_sampler
from pipeline.search.summary import FINISHED, budget_spent, format_trial_line
from pipeline.tracking.writer import QueuedClient

MAX_CONSECUTIVE_FAILURES = 5


def claim_trial(study, plan: Plan, deadline: float | None, spent=budget_spent, claimed=None):
    """Take the next trial if the study's budget allows, atomically across processes.

    ``spent(trials, n_trials)`` decides; by default the budget counts complete, pruned, running
    and waiting trials (failed ones are replaced). Enqueued (waiting) trials are taken first.
    ``claimed(study, trial)`` runs under the same lock, with the trial just taken.
    """
    if deadline is not None and time.time() > deadline:
        return None
    with storage_mod.study_lock(plan.storage, plan.key):
        if spent(study.get_trials(deepcopy=False), plan.n_trials):
            return None
        with warnings.catch_warnings():  # we beat ourselves (storage.Heartbeat), not optimize()
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
            trial = study.ask()
        trial.set_user_attr(liveness.WORKER_ATTR, liveness.worker_id())  # see fail_stale
        if claimed is not None:
            claimed(study, trial)
        return trial


def _own_sampler_seed(study, plan: Plan, search_space: dict) -> None:
    """Workers built from one seed drew the same parameters: four launchers of a random-search
    study tried its first point four times. The n-th worker to start on a study samples with
    seed + n (the first keeps the study's seed, so a lone worker reproduces it); QMC keeps
    one seed, since its points come from one sequence the workers share through the study."""
    if plan.cfg.sampler.name not in ("random", "tpe", "gp"):
        return
    with storage_mod.study_lock(plan.storage, plan.key):
        n = study.user_attrs.get("workers_started", 0)
        study.set_user_attr("workers_started", n + 1)
    if n:
        study.sampler = make_sampler(plan.cfg.sampler.name, plan.seed + n,
                                     plan.cfg.sampler.options, search_space)


def run_worker(ctx, study, plan: Plan, client, quiet: bool = False,
               writer: QueuedClient | None = None, after_trial=None) -> bool:
    """Claim and run trials until the budget is spent. Returns True when it stopped because
    too many trials failed in a row (a broken study, not bad luck).

    The trials' MLflow writes go through a `QueuedClient` (``writer``, else one made here on
    ``client``): a child process performs them while the next trial trains, and all of them
    are done when this returns. ``after_trial(seconds)`` is called after each trial."""
    _own_sampler_seed(study, plan, ctx.space)
    own = writer is None
    writer = QueuedClient(client) if own else writer
    try:
        return _run_trials(ctx, study, plan, writer, quiet, after_trial)
    finally:
        if own:
            writer.close()
        else:
            writer.flush()


def _run_trials(ctx, study, plan: Plan, client: QueuedClient, quiet: bool,
                after_trial=None) -> bool:
    from tqdm import tqdm

    deadline = time.time() + plan.cfg.timeout if plan.cfg.timeout else None
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    bar = tqdm(total=plan.n_trials, initial=min(done, plan.n_trials), desc=plan.key,
               unit="trial", disable=True if quiet else None, leave=False, dynamic_ncols=True)
    failures, trial = 0, None
    gc_policy.resume_frozen()  # start-up is over (a process started by an entry point)
    try:
        while (trial := _next_trial(study, plan, client, deadline, ctx)) is not None:
            t0 = time.perf_counter()
            with storage_mod.Heartbeat(study._storage, trial._trial_id):
                state, value = ctx.run(trial, client)
            frozen = study.tell(trial, value, state=state)
            trial = None
            client.check()  # a write that failed for good stops the worker, with its reason
            seconds = time.perf_counter() - t0
            line = format_trial_line(frozen, seconds, ctx.study.objective.metric)
            bar.write(line) if not bar.disable else print(line, flush=True)
            bar.update(1 if state in FINISHED else 0)
            failures = failures + 1 if state == TrialState.FAIL else 0
            if after_trial is not None:
                after_trial(seconds)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                print(f"[{plan.key}] stopping: {failures} trials in a row failed; last error: "
                      f"{frozen.user_attrs.get('error')}", flush=True)
                return True
        return False
    except BaseException as err:
        # Ctrl-C / SIGTERM mid-trial: the trial fails (run_trial already KILLED its run).
        if trial is not None:
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", (
                    f"interrupted: {str(err) or 'Ctrl-C'}"
                    if isinstance(err, (KeyboardInterrupt, interrupt.Terminated))
                    else f"stopped: {type(err).__name__}: {err}")[:500])
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    finally:
        bar.close()


def _next_trial(study, plan: Plan, client, deadline: float | None, ctx):
    """claim_trial; and when only trials RUNNING in other workers stand between the study and
    its budget, wait for them: should their worker die, stale.fail_stale fails and requeues
    them (heartbeats, or a process gone on this machine) and this worker runs the retry, so the
    study still reaches n_trials."""
    while (trial := claim_trial(study, plan, deadline, ctx.spent, ctx.claimed)) is None:
        if (not stale.watched(study.get_trials(deepcopy=False), plan.storage)
                or (deadline is not None and time.time() > deadline)):
            return None
        time.sleep(1.0)
        fail_stale(study, plan, client)
    return trial


def fail_stale(study, plan: Plan, client) -> None:
    """Trials and runs a killed process left RUNNING: failed (trial) and KILLED (run).

    RDB storages decide by heartbeat (a live worker elsewhere keeps its trial); on a journal
    file, a trial whose worker process is gone (liveness.py). Study runs: study_run.open_run.
    """
    failed = stale.fail_stale(study, plan.storage, client)  # and requeued once, runs KILLED
    if failed:
        print(f"[{plan.key}] marked {len(failed)} stale trial(s) failed: "
              f"{[t.number for t in failed]} (each requeued once with the same parameters)",
              flush=True)
