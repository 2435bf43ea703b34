"""A study execution's plan: the study file, dataset, budget, seed, storage and the studies it
builds on, all resolved and checked before any store is written."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import DATASETS, ConfigError, format_problems, validation_problems
from pipeline.search import storage as storage_mod
from pipeline.search.studyfile import (
    STUDIES_DIR,
    RecheckConfig,
    StudyConfig,
    load_study,
    resolve_study_path,
    smoke_config,
)


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
    source_key: str | None = None  # a transfer study's source (pipeline.search.transfer)
    recheck_only: bool = False  # re-check the finished study, run no search trial


def study_key(name: str, file_dataset: str, dataset: str, smoke: bool) -> str:
    """The Optuna study name: one study per (study file, dataset), smoke runs kept apart."""
    key = name if dataset == file_dataset else f"{name}-{dataset}"
    return f"{key}-smoke" if smoke else key


def study_flags(key: str, dataset: str) -> str:
    """The flags that name study ``key`` (run on ``dataset``) to a command, study_key's inverse:
    ``--study NAME``, plus ``--dataset D`` when the key carries one, plus ``--smoke``."""
    name = key.removesuffix("-smoke")
    flags = ["--study", name]
    if dataset and name.endswith(f"-{dataset}"):
        flags = ["--study", name.removesuffix(f"-{dataset}"), "--dataset", dataset]
    return " ".join(flags + (["--smoke"] if key.endswith("-smoke") else []))


def plan_study(opts) -> Plan:
    studies_dir = Path(opts.studies_dir) if opts.studies_dir else None
    cfg = load_study(opts.study, studies_dir)
    file_dataset = cfg.dataset
    if opts.dataset:
        if opts.dataset not in DATASETS:
            raise ConfigError(f"--dataset {opts.dataset!r} is not one of {', '.join(DATASETS)}")
        cfg = cfg.model_copy(update={"dataset": opts.dataset})
    if opts.recheck_only or opts.recheck_top_k is not None or opts.recheck_seeds is not None:
        cfg = _with_recheck(cfg, opts)
    if opts.smoke:
        cfg = smoke_config(cfg)
    n_trials = cfg.n_trials if opts.smoke or opts.n_trials is None else opts.n_trials
    seed = cfg.sampler.seed if opts.seed is None else opts.seed
    parent_key = None
    if cfg.parent:
        parent = load_study(cfg.parent, Path(studies_folder(opts)))
        parent_key = study_key(parent.name, parent.dataset, cfg.dataset, opts.smoke)
    source_key = plan_study(source_opts(opts, cfg)).key if cfg.source else None
    return Plan(cfg, study_key(cfg.name, file_dataset, cfg.dataset, opts.smoke), n_trials, seed,
                storage_mod.parse_storage(opts.storage), parent_key,
                resolve_study_path(opts.study, studies_dir or STUDIES_DIR), source_key,
                opts.recheck_only)


def _with_recheck(cfg: StudyConfig, opts) -> StudyConfig:
    """The study file's ``recheck`` (else the defaults) with the command line's overrides."""
    given = {k: v for k, v in (("top_k", opts.recheck_top_k), ("seeds", opts.recheck_seeds))
             if v is not None}
    values = {**(cfg.recheck or RecheckConfig()).model_dump(), **given}
    try:
        return cfg.model_copy(update={"recheck": RecheckConfig(**values)})
    except ValidationError as err:
        raise ConfigError(format_problems("re-check options", [
            "--" + p.replace("_", "-", 1) if p.startswith("top_k") else f"--{p}"
            for p in validation_problems(err)])) from None


def studies_folder(opts) -> str:
    """Where a study's parent and source files are: beside the study file (``--study PATH``),
    else in ``studies/``."""
    return opts.studies_dir or str(resolve_study_path(opts.study).parent)


def source_opts(opts, cfg: StudyConfig):
    """The options that run a transfer study's source: its own file, dataset, budget and seed;
    in smoke mode on digits, so that checking a transfer study needs no download."""
    return replace(opts, study=cfg.source, dataset="digits" if opts.smoke else None,
                   n_trials=None, seed=None, studies_dir=studies_folder(opts),
                   **ON_BEHALF)


# What a study run on another's behalf (a parent, a source) must not inherit: the re-check
# overrides, and helper workers (the launcher has opened its stores, which a fork must not copy:
# processes.fork_pool).
ON_BEHALF = {"recheck_top_k": None, "recheck_seeds": None, "recheck_only": False, "workers": 1}


def nothing_to_recheck(plan: Plan) -> str:
    return (f"study {plan.key!r} has no completed trial in {plan.storage.url} to re-check. Run "
            f"it first: python -m pipeline.search --study {plan.study_file.stem}"
            + (f" --dataset {plan.cfg.dataset}" if f"-{plan.cfg.dataset}" in plan.key else ""))


def check_recheck_only(plan: Plan) -> None:
    """A re-check of a study that never ran is refused before any store is created, and
    before torch and MLflow load (Optuna's storage alone tells)."""
    if plan.storage.path and not Path(plan.storage.path).exists():
        raise ConfigError(nothing_to_recheck(plan))
    if plan.storage.kind == "rdb" and storage_mod.no_optuna_tables(plan.storage):
        raise ConfigError(nothing_to_recheck(plan))  # opening it would create Optuna's tables
