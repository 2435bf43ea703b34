"""Creating or resuming a study: the narrowed space from its parent, the Optuna study (created
once, under the lock, with its settings as user attributes and the parent's best configurations
enqueued) and its MLflow study run."""

from __future__ import annotations

import json
import warnings

import optuna
from optuna.trial import TrialState

from pipeline import names
from pipeline.config import ConfigError, describe_fidelity, epoch_range, fidelity, format_problems
from pipeline.search import (
    limits as limits_mod,
    narrow,
    space as space_mod,
    storage as storage_mod,
    study_run,
)
from pipeline.search.plan import Plan
from pipeline.search.samplers import make_pruner, make_sampler
from pipeline.search.studyfile import STUDIES_DIR, StudyConfig, load_study
from pipeline.tracking import client as tracking, context


def study_exists(storage, key: str) -> bool:
    return any(s.study_name == key for s in storage.get_all_studies())


def has_completed_trials(storage, key: str) -> bool:
    """Whether the study exists and has a completed trial to narrow from."""
    if not study_exists(storage, key):
        return False
    study = optuna.load_study(study_name=key, storage=storage)
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def narrow_from_parent(plan: Plan, storage) -> dict:
    """Compute the fine space from the parent's best completed trials (pure over plain data)."""
    if not has_completed_trials(storage, plan.parent_key):
        raise narrow.NarrowingError(run_parent_first(plan))
    parent = optuna.load_study(study_name=plan.parent_key, storage=storage)
    parent_space = parent.user_attrs["space"]
    trials = [{"number": t.number, "value": t.value, "params": t.params}
              for t in parent.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    cfg, rule = plan.cfg, plan.cfg.narrow
    limits, problems = limits_mod.derived_limits(parent_space, cfg.limits, cfg.space, cfg.fixed)
    if problems:
        raise ConfigError(format_problems(f"study file {plan.study_file}", problems))
    record = narrow.narrow_space(
        parent_space, trials, parent.user_attrs.get("direction", "maximize"),
        top_k=rule.top_k, top_fraction=rule.top_fraction, margin=rule.margin,
        boundary_fraction=rule.boundary_fraction, enqueue=rule.enqueue,
        keep=[n for n in parent_space if n not in cfg.fixed], limits=limits)
    record["parent"] = plan.parent_key
    # The classic recipe explores short and small, then exploits long and full: say how each ran.
    record["fidelity"] = {
        "parent": fidelity(parent.user_attrs.get("fixed", {}),
                           space_mod.bounds(space_mod.from_plain(parent_space))),
        "this": fidelity(cfg.fixed, space_mod.bounds(space_mod.from_plain(record["space"])))}
    before, now = record["fidelity"]["parent"], record["fidelity"]["this"]
    if before != now:
        print(f"[{plan.key}] {plan.parent_key} trained on {describe_fidelity(before)}; this "
              f"study trains on {describe_fidelity(now)}")
    for name, rec in record["params"].items():
        edges = narrow.describe_edges(rec["edges"])
        if rec["boundary"]:
            print(f"[{plan.key}] warning: {name}'s best values crowd the {rec['boundary']} edge "
                  f"of {plan.parent_key}'s range; the optimum may lie outside it"
                  + (f": {edges}" if edges else ""))
        elif edges:
            print(f"[{plan.key}] {name}: {edges}")
    return record


def run_parent_first(plan: Plan) -> str:
    """The message for a study whose parent has not run: the command that runs it."""
    folder = plan.study_file.parent
    parent = (plan.cfg.parent if folder.resolve() == STUDIES_DIR.resolve()
              else str(folder / f"{plan.cfg.parent}.yaml"))
    return (f"parent study {plan.parent_key!r} has no completed trial in {plan.storage.url}. "
            f"Run it first: python -m pipeline.search --study {parent}"
            + (f" --dataset {plan.cfg.dataset}"
               if load_study(plan.cfg.parent, folder).dataset != plan.cfg.dataset else ""))


def create_or_load(plan: Plan, storage, narrowing):
    """Create the study once (under the lock, so concurrent launchers agree) or load it."""
    cfg = plan.cfg
    with storage_mod.study_lock(plan.storage, plan.key):
        exists = study_exists(storage, plan.key)
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
        pruner = make_pruner(cfg.pruner.name, cfg.pruner.options, max_epochs(cfg, search_space))
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
            with warnings.catch_warnings():  # experimental in Optuna; the dashboard shows it
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([cfg.objective.metric])
            for seed_params in (narrowing or {}).get("seeds", [])[:plan.n_trials]:
                study.enqueue_trial(seed_params, user_attrs={"seeded_from": plan.parent_key})
    return study, search_space


def max_epochs(cfg: StudyConfig, search_space: dict) -> int:
    """The longest a trial can train, for Hyperband's max_resource."""
    return int(epoch_range(cfg.fixed, space_mod.bounds(search_space))[1])


def start_study_run(client, experiment_id, plan: Plan, study, search_space) -> str:
    """Join the study's open run (other workers, other machines) or create and describe it."""
    cfg = plan.cfg
    run_id, created = study_run.open_run(
        client, experiment_id, plan.storage, study, plan.key,
        tags=context.with_context({
            names.KIND: names.KIND_STUDY, names.STUDY: plan.key,
            names.PARENT_STUDY: plan.parent_key or "", names.OPTUNA_STORAGE: plan.storage.url,
            names.DATASET: cfg.dataset}))
    if not created:
        return run_id
    # Namespaced: `mlflow run` has already logged the entry point's own parameters here.
    tracking.log_params(client, run_id, {
        "study.sampler": cfg.sampler.name, "study.sampler_seed": plan.seed,
        "study.pruner": cfg.pruner.name, "study.n_trials": plan.n_trials,
        "study.dataset": cfg.dataset, "study.metric": cfg.objective.metric,
        "study.direction": cfg.objective.direction, "study.parent": plan.parent_key or "",
        **{f"fixed.{k}": v for k, v in cfg.fixed.items()}})
    files = {names.STUDY_FILE: plan.study_file.read_text(),
             names.SEARCH_SPACE: json.dumps(space_mod.to_plain(search_space), indent=2)}
    narrowing = study.user_attrs.get("narrowing")
    if narrowing:
        files[names.NARROWING] = json.dumps({**narrowing, "space": study.user_attrs["space"]},
                                             indent=2)
        tracking.set_tags(client, run_id, {f"{names.BOUNDARY_PREFIX}{n}": edge for n, edge
                                           in narrowing["boundary_flags"].items()})
    tracking.log_artifacts(client, run_id, files)
    return run_id
