"""Optuna samplers and pruners by the names study files use."""

from __future__ import annotations

import warnings

import optuna

from pipeline.search import space as space_mod


class _GridSampler(optuna.samplers.GridSampler):
    """Workers stop on the trial budget; Optuna's own after_trial calls study.stop(), which
    raises outside study.optimize (our workers use ask/tell)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


SAMPLERS = {
    "qmc": optuna.samplers.QMCSampler,
    "random": optuna.samplers.RandomSampler,
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "grid": optuna.samplers.GridSampler,
}
PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}


def make_sampler(name: str, seed: int, options: dict, space: dict) -> optuna.samplers.BaseSampler:
    """Quasi-random search is scrambled Sobol: wide exploration without grid artefacts."""
    if name == "grid":
        return _GridSampler(space_mod.grid(space), seed=seed, **options)
    if name == "qmc":
        options = {"scramble": True, "warn_independent_sampling": False, **options}
    with warnings.catch_warnings():  # QMC and GP are marked experimental; we chose them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[name](seed=seed, **options)


def make_pruner(name: str, options: dict, max_epochs: int) -> optuna.pruners.BasePruner:
    """Pruners work on epochs: trials report their validation metric once per epoch."""
    if name == "hyperband":
        options = {"min_resource": 1, "max_resource": max_epochs, **options}
    if name == "median":
        options = {"n_startup_trials": 5, "n_warmup_steps": 2, **options}
    return PRUNERS[name](**options)
