"""Study orchestration: check everything, create or resume the study, run workers, summarise.

Order matters for "nothing half-created": every check (study file, parent, storage, dataset,
tracking store) runs before the Optuna study or any MLflow run is created.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import narrow, objective, space as space_mod, storage as storage_mod, tracking
from pipeline.config import ConfigError, TrainConfig
from pipeline.data import DatasetNotFound, load_splits
from pipeline.samplers import make_pruner, make_sampler
from pipeline.study import STUDIES_DIR, StudyConfig, load_study, resolve_study_path
from pipeline.summary import format_trial_line, summarize

BAD_INPUT = (ConfigError, storage_mod.StorageError, DatasetNotFound,
             tracking.TrackingUnavailable, narrow.NarrowingError)
MAX_CONSECUTIVE_FAILURES = 5
EXIT_FAILED = 1
SMOKE_TRIALS = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


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


def study_key(name: str, file_dataset: str, dataset: str, smoke: bool) -> str:
    """The Optuna study name: one study per (study file, dataset), smoke runs kept apart."""
    key = name if dataset == file_dataset else f"{name}-{dataset}"
    return f"{key}-smoke" if smoke else key


def smoke_config(cfg: StudyConfig) -> StudyConfig:
    """A tiny budget: one short cycle (or two epochs), a small subset for the big datasets."""
    fixed = {**cfg.fixed, "cycles": 1, "step_size_epochs": 1,
             "epochs": min(cfg.fixed.get("epochs", 2), 2)}
    if cfg.dataset != "digits":
        fixed["n_per_class"] = min(cfg.fixed.get("n_per_class") or 50, 50)
    space = {n: s for n, s in cfg.space.items() if n not in fixed}
    return cfg.model_copy(update={"fixed": fixed, "space": space,
                                  "n_trials": min(cfg.n_trials, SMOKE_TRIALS), "timeout": None})


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
        parent = load_study(cfg.parent, studies_dir or resolve_study_path(opts.study).parent)
        parent_key = study_key(parent.name, parent.dataset, cfg.dataset, opts.smoke)
    return Plan(cfg, study_key(cfg.name, file_dataset, cfg.dataset, opts.smoke), n_trials, seed,
                storage_mod.parse_storage(opts.storage), parent_key,
                resolve_study_path(opts.study, studies_dir or STUDIES_DIR))


def run_study(opts) -> int:
    """Check, create or resume, run, summarise. Returns the exit code."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    plan = plan_study(opts)
    if (plan.parent_key and not opts.smoke and plan.storage.path
            and not Path(plan.storage.path).exists()):
        raise narrow.NarrowingError(_run_parent_first(plan))
    storage = storage_mod.open_storage(plan.storage)
    load_splits(plan.cfg.dataset, plan.cfg.fixed.get("data_dir"), plan.cfg.fixed.get("data_seed", 0),
                plan.cfg.fixed.get("val_fraction", 0.2), plan.cfg.fixed.get("n_per_class"))
    narrowing = None
    if plan.parent_key and not _study_exists(storage, plan.key):
        narrowing = _narrow_from_parent(plan, storage, opts)
    client = tracking.tracking_client()
    tracking.check_store(client)

    study, search_space = _create_or_load(plan, storage, narrowing)
    _fail_stale(study, plan, client)
    experiment_id = tracking.resolve_experiment(client, opts.experiment)
    run_id = _start_study_run(client, experiment_id, plan, study, search_space)
    ctx = objective.TrialContext(plan.cfg, plan.key, search_space, experiment_id, run_id, plan.seed)
    status = "KILLED"
    try:
        if opts.workers > 1:
            broken = _run_processes(opts, plan, ctx)
        else:
            broken = run_worker(ctx, study, plan, client, quiet=opts.quiet)
        summary = summarize(study.get_trials(deepcopy=False), plan.cfg.objective.direction)
        _log_summary(client, run_id, plan, summary)
        # A study that keeps failing, or has nothing to show, is a failed execution.
        broken = broken or (summary["n_complete"] == 0 and summary["n_failed"] > 0)
        status = "FAILED" if broken else "FINISHED"
    finally:
        tracking.end_run(client, run_id, status)
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
            run_study(replace(opts, study=plan.cfg.parent, n_trials=None))
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
    return (f"parent study {plan.parent_key!r} has no completed trial in {plan.storage.url}. "
            f"Run it first: python -m pipeline.search --study {plan.cfg.parent}"
            + (f" --dataset {plan.cfg.dataset}" if plan.parent_key != plan.cfg.parent else ""))


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

    RDB storages decide by heartbeat (a live worker elsewhere keeps its trial); a journal file
    is used by one launcher at a time, so anything RUNNING at start is stale.
    """
    if plan.storage.kind == "rdb":
        optuna.storages.fail_stale_trials(study)
        stale = []
    else:
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            study._storage.set_trial_user_attr(t._trial_id, "error", "stale: its process died")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    for t in stale:
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            tracking.end_run(client, run_id, "KILLED")
    if plan.storage.kind != "rdb":
        for run in client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string=f"tags.`pipeline.study` = '{plan.key}' and "
                              "tags.`pipeline.kind` = 'study' and attributes.status = 'RUNNING'"):
            tracking.end_run(client, run.info.run_id, "KILLED")
    if stale:
        print(f"[{plan.key}] marked {len(stale)} stale trial(s) failed: "
              f"{[t.number for t in stale]}")


def _start_study_run(client, experiment_id, plan: Plan, study, search_space) -> str:
    cfg = plan.cfg
    run_id = tracking.start_run(
        client, experiment_id, plan.key, adopt_env_run=True,
        tags={"pipeline.kind": "study", "pipeline.study": plan.key,
              "pipeline.parent_study": plan.parent_key or "",
              "pipeline.optuna_storage": plan.storage.url, "pipeline.dataset": cfg.dataset})
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
    study.set_user_attr("mlflow_run_id", run_id)
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
        trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING,
                                                          TrialState.WAITING))
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and len(trials) >= plan.n_trials:
            return None
        return study.ask()


def run_worker(ctx, study, plan: Plan, client, quiet: bool = False) -> bool:
    """Claim and run trials until the budget is spent. Returns True when it stopped because
    too many trials failed in a row (a broken study, not bad luck)."""
    from tqdm import tqdm

    deadline = time.time() + plan.cfg.timeout if plan.cfg.timeout else None
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    bar = tqdm(total=plan.n_trials, initial=min(done, plan.n_trials), desc=plan.key,
               unit="trial", disable=True if quiet else None, leave=False, dynamic_ncols=True)
    failures, trial = 0, None
    try:
        while (trial := claim_trial(study, plan, deadline)) is not None:
            t0 = time.perf_counter()
            with storage_mod.Heartbeat(study._storage, trial._trial_id):
                state, value = objective.run_trial(ctx, trial, client)
            frozen = study.tell(trial, value, state=state)
            trial = None
            line = format_trial_line(frozen, time.perf_counter() - t0, ctx.study.objective.metric)
            bar.write(line) if not bar.disable else print(line, flush=True)
            bar.update(1 if state in FINISHED else 0)
            failures = failures + 1 if state == TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                print(f"[{plan.key}] stopping: {failures} trials in a row failed; last error: "
                      f"{frozen.user_attrs.get('error')}", flush=True)
                return True
        return False
    except BaseException:
        # Ctrl-C / SIGTERM mid-trial: the trial fails (run_trial already KILLED its run).
        if trial is not None:
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    finally:
        bar.close()


EXIT_STOPPED_ON_FAILURES = 3


def _worker_process(opts, ctx) -> None:
    """Entry point of a worker process (spawned): its own storage and tracking connections."""
    import torch

    # K workers share the machine's cores: without this each starts one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    plan = plan_study(opts)
    storage = storage_mod.open_storage(plan.storage)
    study = optuna.load_study(study_name=plan.key, storage=storage,
                              sampler=make_sampler(plan.cfg.sampler.name, plan.seed,
                                                   plan.cfg.sampler.options, ctx.space),
                              pruner=make_pruner(plan.cfg.pruner.name, plan.cfg.pruner.options,
                                                 _max_epochs(plan.cfg, ctx.space)))
    if run_worker(ctx, study, plan, tracking.tracking_client(), quiet=True):
        raise SystemExit(EXIT_STOPPED_ON_FAILURES)


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
    bad = [p.name for p in procs if p.exitcode not in (0, EXIT_STOPPED_ON_FAILURES)]
    if bad:
        print(f"[{plan.key}] warning: {', '.join(bad)} exited abnormally")
    return any(p.exitcode == EXIT_STOPPED_ON_FAILURES for p in procs)


# -- summary ------------------------------------------------------------------------------------


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
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = client.download_artifacts(trial_run, "config.json", tmp)
        weights = client.download_artifacts(trial_run, "model/state_dict.pt", tmp)
        cfg = TrainConfig(**json.loads(Path(cfg_path).read_text()))
        splits = load_splits(cfg.dataset, cfg.data_dir, cfg.data_seed, cfg.val_fraction,
                             cfg.n_per_class)
        model = build_model(cfg, splits.input_shape, splits.n_classes)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
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
