"""Search spaces: the only place that calls ``trial.suggest_*`` (no MLflow here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from pipeline.search.params import BundleParam, CategoricalParam, FloatParam, IntParam


def suggest(trial: optuna.Trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """Sample every parameter of ``space`` (name -> spec) for this trial."""
    params = {}
    for name, spec in space.items():
        if isinstance(spec, FloatParam):
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntParam):
            params[name] = trial.suggest_int(name, spec.low, spec.high, step=spec.step,
                                             log=spec.log)
        else:  # categorical, or a bundle: the names of its choices
            params[name] = trial.suggest_categorical(name, list(spec.choices))
    return params


def distributions(space: Mapping[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of each parameter (for create_trial and grid checks)."""
    out = {}
    for name, spec in space.items():
        if isinstance(spec, FloatParam):
            out[name] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntParam):
            out[name] = optuna.distributions.IntDistribution(spec.low, spec.high, log=spec.log,
                                                             step=spec.step)
        else:
            out[name] = optuna.distributions.CategoricalDistribution(list(spec.choices))
    return out


def bounds(space: Mapping[str, Any]) -> dict[str, tuple]:
    """The lowest and highest value of each numeric parameter (categoricals of numbers too)."""
    out = {}
    for name, spec in space.items():
        if isinstance(spec, (FloatParam, IntParam)):
            out[name] = (spec.low, spec.high)
        elif isinstance(spec, CategoricalParam) and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in spec.choices):
            out[name] = (min(spec.choices), max(spec.choices))
    return out


def grid(space: Mapping[str, CategoricalParam]) -> dict[str, list]:
    """Search space for Optuna's GridSampler."""
    return {name: list(spec.choices) for name, spec in space.items()}


def to_plain(space: Mapping[str, Any]) -> dict[str, dict]:
    """JSON-ready form (study user attrs, artifacts, narrowing input)."""
    return {name: spec.model_dump() for name, spec in space.items()}


def from_plain(plain: Mapping[str, dict]) -> dict[str, Any]:
    kinds = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam,
             "bundle": BundleParam}
    return {name: kinds[d["type"]](**d) for name, d in plain.items()}
