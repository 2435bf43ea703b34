"""Study orchestration: check everything, create or resume the study, run workers, summarise.

Order matters for "nothing half-created": every check (study file, parent, storage, dataset,
tracking store) runs before the Optuna study or any MLflow run is created.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import (checkpoint, gc_policy, interrupt, liveness, narrow, objective,
                      space as space_mod, spool, stale, storage as storage_mod, study_run,
                      tracking)
from pipeline import transfer, winner
from pipeline.config import ConfigError, TrainConfig
from pipeline.data import DatasetNotFound, load_splits, splits_for
from pipeline.samplers import make_pruner, make_sampler
from pipeline.study import (STUDIES_DIR, CategoricalParam, StudyConfig, load_study,
                            resolve_study_path)
from pipeline.summary import format_trial_line, summarize
from pipeline.tracking_writer import QueuedClient

BAD_INPUT = (ConfigError, storage_mod.StorageError, DatasetNotFound,
             tracking.TrackingUnavailable, narrow.NarrowingError)
MAX_CONSECUTIVE_FAILURES = 5
EXIT_FAILED = 1
SMOKE_TRIALS = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class Plan:
    """Everything checked and resolved before any store is written."""

    cfg: StudyConfig
    key: str  # Optuna study name
    n_trials: int
    seed: int
    storage: storage_mod.StorageSpec
    parent_key: str | None
    study_file: Path
    source_key: str | None = None  # a transfer study's source (pipeline.transfer)


def study_key(name: str, file_dataset: str, dataset: str, smoke: bool) -> str:
    """The Optuna study name: one study per (study file, dataset), smoke runs kept apart."""
    key = name if dataset == file_dataset else f"{name}-{dataset}"
    return f"{key}-smoke" if smoke else key


def smoke_config(cfg: StudyConfig) -> StudyConfig:
    """A tiny budget: one short cycle (or two epochs), a small subset for the big datasets."""
    fixed = {**cfg.fixed, "cycles": 1, "step_size_epochs": 1,
             "epochs": min(cfg.fixed.get("epochs", 2), 2)}
    searched = cfg.space.get("n_per_class")
    if cfg.dataset != "digits" and searched is None:
        fixed["n_per_class"] = min(cfg.fixed.get("n_per_class") or 50, 50)
    space = {n: s for n, s in cfg.space.items() if n not in fixed}
    n_trials = min(cfg.n_trials, SMOKE_TRIALS)
    if isinstance(searched, CategoricalParam):
        # A training-size study stays one, on subsets every dataset has (a digits class has
        # about 115 training examples).
        capped = dict.fromkeys(min(c or 50, 50) for c in searched.choices)
        space["n_per_class"] = searched.model_copy(update={"choices": tuple(capped)})
    if cfg.sampler.name == "grid":  # more trials than points would repeat points
        n_trials = min(n_trials, math.prod(len(s.choices) for s in space.values()))
    return cfg.model_copy(update={"fixed": fixed, "space": space, "n_trials": n_trials,
                                  "timeout": None})


def plan_study(opts) -> Plan:
    studies_dir = Path(opts.studies_dir) if opts.studies_dir else None
    cfg = load_study(opts.study, studies_dir)
    file_dataset = cfg.dataset
    if opts.dataset:
        if opts.dataset not in ("digits", "fashion-mnist", "mnist", "cifar10"):
            raise ConfigError(f"--dataset {opts.dataset!r} is not one of digits, fashion-mnist, "
                              "mnist, cifar10")
        cfg = cfg.model_copy(update={"dataset": opts.dataset})
    if opts.smoke:
        cfg = smoke_config(cfg)
    n_trials = cfg.n_trials if opts.smoke or opts.n_trials is None else opts.n_trials
    seed = cfg.sampler.seed if opts.seed is None else opts.seed
    parent_key = None
    if cfg.parent:
        parent = load_study(cfg.parent, Path(_studies_folder(opts)))
        parent_key = study_key(parent.name, parent.dataset, cfg.dataset, opts.smoke)
    source_key = plan_study(_source_opts(opts, cfg)).key if cfg.source else None
    return Plan(cfg, study_key(cfg.name, file_dataset, cfg.dataset, opts.smoke), n_trials, seed,
                storage_mod.parse_storage(opts.storage), parent_key,
                resolve_study_path(opts.study, studies_dir or STUDIES_DIR), source_key)


def _studies_folder(opts) -> str:
    """Where a study's parent and source files are: beside the study file (``--study PATH``),
    else in ``studies/``."""
    return opts.studies_dir or str(resolve_study_path(opts.study).parent)


def _source_opts(opts, cfg: StudyConfig):
    """The options that run a transfer study's source: its own file, dataset, budget and seed;
    in smoke mode on digits, so that checking a transfer study needs no download."""
    return replace(opts, study=cfg.source, dataset="digits" if opts.smoke else None,
                   n_trials=None, seed=None, studies_dir=_studies_folder(opts))


def _resolve_source(plan: Plan, opts, client):
    """The source's winner and its cached weights; in smoke mode the source runs first (in
    smoke mode too) when it has none, as a parent does."""
    from pipeline.data import cache_dir

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
    run_study(_source_opts(opts, plan.cfg))
    return transfer.resolve_source(client, plan.source_key, how, folder)


def run_study(opts) -> int:
    """Check, create or resume, run, summarise. Returns the exit code."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    plan = plan_study(opts)
    if (plan.parent_key and not opts.smoke and plan.storage.path
            and not Path(plan.storage.path).exists()):
        raise narrow.NarrowingError(_run_parent_first(plan))
    load_splits(plan.cfg.dataset, plan.cfg.fixed.get("data_dir"), plan.cfg.fixed.get("data_seed", 0),
                plan.cfg.fixed.get("val_fraction", 0.2), plan.cfg.fixed.get("n_per_class"))
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
    narrowing = None
    if plan.parent_key and not _study_exists(storage, plan.key):
        narrowing = _narrow_from_parent(plan, storage, opts)
    client = client or spool.SpoolingClient(tracking.tracking_client())
    # Every check has passed: the trials' MLflow writer starts now, so that its start-up
    # (importing MLflow, about a second) overlaps the study's setup rather than its first trials.
    writer = QueuedClient(client) if opts.workers == 1 else None
    try:
        return _run_checked(opts, plan, storage, narrowing, client, source, writer)
    finally:
        if writer is not None:
            writer.close()


def _run_checked(opts, plan: Plan, storage, narrowing, client, source, writer) -> int:
    """run_study after every check: create or resume the study and its run, run the trials."""
    study, search_space = _create_or_load(plan, storage, narrowing)
    _fail_stale(study, plan, client)
    experiment_id = tracking.resolve_experiment(client, opts.experiment)
    run_id = _start_study_run(client, experiment_id, plan, study, search_space)
    if source is not None:
        tracking.set_tags(client, run_id, {"pipeline.source_study": source.study_key,
                                           "pipeline.source_run": source.trial_run_id})
    ctx = objective.TrialContext(plan.cfg, plan.key, search_space, experiment_id, run_id, plan.seed,
                                 source)
    status, started = "KILLED", time.time()
    try:
        try:
            if opts.workers > 1:
                broken = _run_processes(opts, plan, ctx)
            else:
                broken = run_worker(ctx, study, plan, client, quiet=opts.quiet, writer=writer)
        except (tracking.TrackingUnavailable, spool.TrackingLost) as err:  # not bad input now
            raise spool.TrackingLost(f"[{plan.key}] {err}".replace(
                "--study NAME", f"--study {plan.key}")) from None
        summary = summarize(study.get_trials(deepcopy=False), plan.cfg.objective.direction)
        # A study that keeps failing, or has nothing to show, is a failed execution.
        broken = broken or (summary["n_complete"] == 0 and summary["n_failed"] > 0)
        status = "FAILED" if broken else "FINISHED"
    finally:
        _close_study_run(client, run_id, plan, study, status, started)
    _print_summary(plan, summary)
    if broken:
        print(f"[{plan.key}] failed: see the failed trials' error.txt in mlflow ui",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


# -- creation -----------------------------------------------------------------------------------


def _study_exists(storage, key: str) -> bool:
    return any(s.study_name == key for s in storage.get_all_studies())


def _narrow_from_parent(plan: Plan, storage, opts) -> dict:
    """Compute the fine space from the parent's best completed trials (pure over plain data)."""
    if not _study_exists(storage, plan.parent_key) or not _completed(storage, plan.parent_key):
        if opts.smoke:  # a smoke check of a chain runs its parents in smoke mode first
            print(f"[{plan.key}] parent {plan.parent_key} has no completed trial: "
                  "running it in smoke mode first")
            run_study(replace(opts, study=plan.cfg.parent, n_trials=None,
                              studies_dir=_studies_folder(opts)))
        else:
            raise narrow.NarrowingError(_run_parent_first(plan))
    parent = optuna.load_study(study_name=plan.parent_key, storage=storage)
    parent_space = parent.user_attrs["space"]
    trials = [{"number": t.number, "value": t.value, "params": t.params}
              for t in parent.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    rule = plan.cfg.narrow
    keep = [n for n in parent_space if n not in plan.cfg.fixed]
    record = narrow.narrow_space(
        parent_space, trials, parent.user_attrs.get("direction", "maximize"),
        top_k=rule.top_k, top_fraction=rule.top_fraction, margin=rule.margin,
        boundary_fraction=rule.boundary_fraction, enqueue=rule.enqueue, keep=keep)
    record["parent"] = plan.parent_key
    for name, edge in record["boundary_flags"].items():
        print(f"[{plan.key}] warning: {name}'s best values crowd the {edge} edge of "
              f"{plan.parent_key}'s range; the optimum may lie outside it")
    return record


def _run_parent_first(plan: Plan) -> str:
    folder = plan.study_file.parent
    parent = (plan.cfg.parent if folder.resolve() == STUDIES_DIR.resolve()
              else str(folder / f"{plan.cfg.parent}.yaml"))
    return (f"parent study {plan.parent_key!r} has no completed trial in {plan.storage.url}. "
            f"Run it first: python -m pipeline.search --study {parent}"
            + (f" --dataset {plan.cfg.dataset}"
               if load_study(plan.cfg.parent, folder).dataset != plan.cfg.dataset else ""))


def _completed(storage, key: str) -> bool:
    study = optuna.load_study(study_name=key, storage=storage)
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _create_or_load(plan: Plan, storage, narrowing):
    """Create the study once (under the lock, so concurrent launchers agree) or load it."""
    cfg = plan.cfg
    with storage_mod.study_lock(plan.storage, plan.key):
        exists = _study_exists(storage, plan.key)
        if exists:
            attrs = optuna.load_study(study_name=plan.key, storage=storage).user_attrs
            search_space = space_mod.from_plain(attrs["space"])
            if attrs.get("dataset") != cfg.dataset:
                raise ConfigError(f"study {plan.key!r} in {plan.storage.url} was made for dataset "
                                  f"{attrs.get('dataset')!r}, not {cfg.dataset!r}")
        else:
            search_space = dict(cfg.space)
            if narrowing:
                search_space = {**space_mod.from_plain(narrowing["space"]), **cfg.space}
        sampler = make_sampler(cfg.sampler.name, plan.seed, cfg.sampler.options, search_space)
        pruner = make_pruner(cfg.pruner.name, cfg.pruner.options, _max_epochs(cfg, search_space))
        study = optuna.create_study(study_name=plan.key, storage=storage, sampler=sampler,
                                    pruner=pruner, direction=cfg.objective.direction,
                                    load_if_exists=True)
        if not exists:
            attrs = {"space": space_mod.to_plain(search_space), "dataset": cfg.dataset,
                     "direction": cfg.objective.direction, "metric": cfg.objective.metric,
                     "sampler": cfg.sampler.name, "seed": plan.seed, "pruner": cfg.pruner.name,
                     "fixed": cfg.fixed, "study_file": str(plan.study_file),
                     "parent": plan.parent_key}
            if narrowing:
                attrs["narrowing"] = {k: v for k, v in narrowing.items() if k != "space"}
            for k, v in attrs.items():
                study.set_user_attr(k, v)
            for seed_params in (narrowing or {}).get("seeds", [])[:plan.n_trials]:
                study.enqueue_trial(seed_params, user_attrs={"seeded_from": plan.parent_key})
    return study, search_space


def _max_epochs(cfg: StudyConfig, search_space: dict) -> int:
    """The longest a trial can train, for Hyperband's max_resource."""
    def top(name):
        spec = search_space.get(name)
        if spec is None:
            return cfg.fixed.get(name, TrainConfig.model_fields[name].default)
        return max(spec.choices) if spec.type == "categorical" else spec.high

    schedule = cfg.fixed.get("schedule", "cyclical")
    if schedule == "constant":
        return int(top("epochs"))
    return int(2 * top("step_size_epochs") * top("cycles"))


def _fail_stale(study, plan: Plan, client) -> None:
    """Trials and runs a killed process left RUNNING: failed (trial) and KILLED (run).

    RDB storages decide by heartbeat (a live worker elsewhere keeps its trial); on a journal
    file, a trial whose worker process is gone (liveness.py). Study runs: study_run.open_run.
    """
    failed = stale.fail_stale(study, plan.storage, client)  # and requeued once, runs KILLED
    if failed:
        print(f"[{plan.key}] marked {len(failed)} stale trial(s) failed: "
              f"{[t.number for t in failed]} (each requeued once with the same parameters)",
              flush=True)


def _start_study_run(client, experiment_id, plan: Plan, study, search_space) -> str:
    """Join the study's open run (other workers, other machines) or create and describe it."""
    cfg = plan.cfg
    run_id, created = study_run.open_run(
        client, experiment_id, plan.storage, study, plan.key,
        tags={"pipeline.kind": "study", "pipeline.study": plan.key,
              "pipeline.parent_study": plan.parent_key or "",
              "pipeline.optuna_storage": plan.storage.url, "pipeline.dataset": cfg.dataset})
    if not created:
        return run_id
    # Namespaced: `mlflow run` has already logged the entry point's own parameters here.
    tracking.log_params(client, run_id, {
        "study.sampler": cfg.sampler.name, "study.sampler_seed": plan.seed,
        "study.pruner": cfg.pruner.name, "study.n_trials": plan.n_trials,
        "study.dataset": cfg.dataset, "study.metric": cfg.objective.metric,
        "study.direction": cfg.objective.direction, "study.parent": plan.parent_key or "",
        **{f"fixed.{k}": v for k, v in cfg.fixed.items()}})
    files = {"study.yaml": plan.study_file.read_text(),
             "search_space.json": json.dumps(space_mod.to_plain(search_space), indent=2)}
    narrowing = study.user_attrs.get("narrowing")
    if narrowing:
        files["narrowing.json"] = json.dumps({**narrowing, "space": study.user_attrs["space"]},
                                             indent=2)
        tracking.set_tags(client, run_id, {f"pipeline.boundary.{n}": edge for n, edge
                                           in narrowing["boundary_flags"].items()})
    tracking.log_artifacts(client, run_id, files)
    return run_id


# -- running ------------------------------------------------------------------------------------


def claim_trial(study, plan: Plan, deadline: float | None):
    """Take the next trial if the study's budget allows, atomically across processes.

    Budget counts complete, pruned, running and waiting trials (failed ones are replaced).
    Enqueued (waiting) trials are always taken first.
    """
    if deadline is not None and time.time() > deadline:
        return None
    with storage_mod.study_lock(plan.storage, plan.key):
        if _budget_spent(study.get_trials(deepcopy=False), plan.n_trials):
            return None
        with warnings.catch_warnings():  # we beat ourselves (storage.Heartbeat), not optimize()
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
            trial = study.ask()
        trial.set_user_attr(liveness.WORKER_ATTR, liveness.worker_id())  # see _fail_stale
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


def _budget_spent(trials, n_trials: int) -> bool:
    counted = [t for t in trials if t.state in (*FINISHED, TrialState.RUNNING,
                                                TrialState.WAITING)]
    waiting = any(t.state == TrialState.WAITING for t in counted)
    return not waiting and len(counted) >= n_trials


def run_worker(ctx, study, plan: Plan, client, quiet: bool = False,
               writer: QueuedClient | None = None) -> bool:
    """Claim and run trials until the budget is spent. Returns True when it stopped because
    too many trials failed in a row (a broken study, not bad luck).

    The trials' MLflow writes go through a `QueuedClient` (``writer``, else one made here on
    ``client``): a child process performs them while the next trial trains, and all of them
    are done when this returns."""
    _own_sampler_seed(study, plan, ctx.space)
    own = writer is None
    writer = QueuedClient(client) if own else writer
    try:
        return _run_trials(ctx, study, plan, writer, quiet)
    finally:
        if own:
            writer.close()
        else:
            writer.flush()


def _run_trials(ctx, study, plan: Plan, client: QueuedClient, quiet: bool) -> bool:
    from tqdm import tqdm

    deadline = time.time() + plan.cfg.timeout if plan.cfg.timeout else None
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    bar = tqdm(total=plan.n_trials, initial=min(done, plan.n_trials), desc=plan.key,
               unit="trial", disable=True if quiet else None, leave=False, dynamic_ncols=True)
    failures, trial = 0, None
    gc_policy.resume_frozen()  # start-up is over (a process started by an entry point)
    try:
        while (trial := _next_trial(study, plan, client, deadline)) is not None:
            t0 = time.perf_counter()
            with storage_mod.Heartbeat(study._storage, trial._trial_id):
                state, value = objective.run_trial(ctx, trial, client)
            frozen = study.tell(trial, value, state=state)
            trial = None
            client.check()  # a write that failed for good stops the worker, with its reason
            line = format_trial_line(frozen, time.perf_counter() - t0, ctx.study.objective.metric)
            bar.write(line) if not bar.disable else print(line, flush=True)
            bar.update(1 if state in FINISHED else 0)
            failures = failures + 1 if state == TrialState.FAIL else 0
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


def _next_trial(study, plan: Plan, client, deadline: float | None):
    """claim_trial; and when only trials RUNNING in other workers stand between the study and
    its budget, wait for them: should their worker die, stale.fail_stale fails and requeues
    them (heartbeats, or a process gone on this machine) and this worker runs the retry, so the
    study still reaches n_trials."""
    while (trial := claim_trial(study, plan, deadline)) is None:
        if (not stale.watched(study.get_trials(deepcopy=False), plan.storage)
                or (deadline is not None and time.time() > deadline)):
            return None
        time.sleep(1.0)
        _fail_stale(study, plan, client)
    return trial


EXIT_STOPPED_ON_FAILURES = 3
EXIT_TRACKING_LOST = 4


def _worker_process(opts, ctx) -> None:
    """Entry point of a worker process (spawned): its own storage and tracking connections."""
    import torch

    gc_policy.pause()  # until its loop starts (gc_policy.py)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # K workers share the machine's cores: without this each starts one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    plan = plan_study(opts)
    storage = storage_mod.open_storage(plan.storage)
    study = optuna.load_study(study_name=plan.key, storage=storage,
                              sampler=make_sampler(plan.cfg.sampler.name, plan.seed,
                                                   plan.cfg.sampler.options, ctx.space),
                              pruner=make_pruner(plan.cfg.pruner.name, plan.cfg.pruner.options,
                                                 _max_epochs(plan.cfg, ctx.space)))
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


def _run_processes(opts, plan: Plan, ctx) -> bool:
    """Run K worker processes; True when one stopped because trials kept failing."""
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_worker_process, args=(opts, ctx), name=f"worker-{i}")
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


# -- summary ------------------------------------------------------------------------------------


def _close_study_run(client, run_id: str, plan: Plan, study, status: str, started: float) -> None:
    """The last worker out (of every launcher sharing the run) logs the study's summary and ends
    its run; the others leave it open. Last: no trial is running and, unless this worker is
    stopping early (failures, interrupt), the budget or the time is spent."""
    deadline = started + plan.cfg.timeout if plan.cfg.timeout else None

    def done(trials) -> bool:
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if plan.storage.kind == "rdb":  # heartbeats decide there, at the next start
            live = running
        else:
            live = [t for t in running
                    if liveness.is_alive(t.user_attrs.get(liveness.WORKER_ATTR))]
        return not live and (status != "FINISHED" or _budget_spent(trials, plan.n_trials)
                             or (deadline is not None and time.time() > deadline))

    if not study_run.claim_close(plan.storage, study, run_id, done):
        return
    try:
        if status != "KILLED":
            summary = summarize(study.get_trials(deepcopy=False), plan.cfg.objective.direction)
            _log_summary(client, run_id, plan, summary)
            if summary["n_complete"] == 0 and summary["n_failed"] > 0:
                status = "FAILED"
    finally:
        tracking.end_run(client, run_id, status)


def _log_summary(client, run_id: str, plan: Plan, summary: dict) -> None:
    metrics = {"n_complete": summary["n_complete"], "n_pruned": summary["n_pruned"],
               "n_failed": summary["n_failed"]}
    best = summary.get("best")
    if best:
        metrics |= {"best_val_acc": best["value"], "best_trial": best["number"]}
        if best.get("test_acc") is not None:
            metrics["test_acc"] = best["test_acc"]
        tracking.log_params(client, run_id, {f"best.{k}": v for k, v in best["params"].items()})
        _log_best_model(client, run_id, plan, best)
    tracking.log_metrics(client, run_id, metrics)
    tracking.log_artifacts(client, run_id, {"summary.json": json.dumps(summary, indent=2,
                                                                        default=str)})


RUN_END_WAIT = 120.0  # seconds


def _run_ended(client, run_id: str) -> bool:
    """Wait until a trial's run has ended. Its files are complete then: a trial's writes land
    in order, after its Optuna state, and its run's end is the last of them, so a study closed
    by another worker (scale-out) may find its best trial's files still on their way."""
    deadline = time.monotonic() + RUN_END_WAIT
    while client.get_run(run_id).info.status == "RUNNING":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _log_best_model(client, run_id: str, plan: Plan, best: dict) -> None:
    """The best trial's model as an MLflow PyTorch model (with signature) on the study run."""
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from pipeline.model import build_model

    trial_run = best.get("mlflow_run_id")
    if not trial_run:
        return
    if not study_run.is_trial_run(client, trial_run, plan.key, best["number"]):
        print(f"[{plan.key}] warning: best model not logged: run {trial_run} is not a trial run "
              "this pipeline wrote for this study, and only those are loaded", file=sys.stderr)
        return
    if not _run_ended(client, trial_run):
        print(f"[{plan.key}] warning: best model not logged: run {trial_run} was still RUNNING "
              f"after {RUN_END_WAIT:g} s (its worker's writes had not all landed)",
              file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = client.download_artifacts(trial_run, "config.json", tmp)
        weights = client.download_artifacts(trial_run, "model/state_dict.pt", tmp)
        cfg = TrainConfig(**json.loads(Path(cfg_path).read_text()))
        splits = splits_for(cfg)
        model = build_model(cfg, splits.input_shape, splits.n_classes)
        try:
            model.load_state_dict(checkpoint.load_state_dict(weights))
        except checkpoint.UnsafeCheckpoint as err:
            print(f"[{plan.key}] warning: best model not logged: {err}", file=sys.stderr)
            return
    model.eval()
    example = splits.x_val[:4].numpy()
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    # pt2 (torch.export) is MLflow's safe format: loading it executes no pickled code.
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example.astype(np.float32),
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    client.update_run(run_id, status="RUNNING")  # the fluent end_run marked it FINISHED
    tracking.set_tags(client, run_id, {"pipeline.best_model_uri": info.model_uri,
                                       "pipeline.best_trial_run": trial_run})


def _print_summary(plan: Plan, summary: dict) -> None:
    print(f"\n[{plan.key}] {summary['n_complete']} complete, {summary['n_pruned']} pruned, "
          f"{summary['n_failed']} failed (of {plan.n_trials} requested)")
    best = summary.get("best")
    if best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        test = best.get("test_acc")
        print(f"[{plan.key}] best trial {best['number']}: {plan.cfg.objective.metric} "
              f"{best['value']:.4f}" + (f", test_acc {test:.4f}" if test is not None else ""))
        print(f"[{plan.key}] best params: {params}")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
