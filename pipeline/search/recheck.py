"""The re-check stage: a study's best trials retrained over fresh seeds, before a winner is named.

A single trial's validation value is one draw of a noisy process, and the search kept the
highest draws. So the ``top_k`` best completed trials (the candidates) are each retrained with
``seeds`` fresh training seeds, the same seeds for every candidate (paired); ``resplit`` also
draws a new train/validation split per seed. The winner is the candidate with the best mean
(pipeline.search.rank), never the original run, which is biased by having been selected.

The work is an Optuna study of its own, ``<study>-recheck``, in the study's storage, so that it
shares everything the search has: workers on one or many machines claim (candidate, seed) pairs
under the study lock, one run per pair; a killed worker's trial is failed and its pair redone;
re-running the stage does only the pairs still missing. Each run is an MLflow child run of the
study run, tagged ``pipeline.kind=recheck``, its candidate's ``pipeline.trial_number`` and
``pipeline.recheck_seed``, with the params, step metrics and artifacts of a trial run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline import names
from pipeline.search import narrow, objective, rank, storage as storage_mod
from pipeline.search.plan import Plan
from pipeline.search.studyfile import PrunerConfig, SamplerConfig

TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # a pair with one is done


def recheck_key(key: str) -> str:
    return f"{key}-recheck"


def recheck_plan(plan: Plan, n_pairs: int) -> Plan:
    """The plan the worker loop runs the re-check under: its own study, no sampling to speak of
    (every trial's configuration is given), no pruner, every pair once."""
    cfg = plan.cfg.model_copy(update={"sampler": SamplerConfig(name="random", seed=plan.seed),
                                      "pruner": PrunerConfig(), "timeout": None})
    return replace(plan, cfg=cfg, key=recheck_key(plan.key), n_trials=n_pairs)


def _pair(trial) -> tuple[int, int] | None:
    attrs = trial.user_attrs
    if names.CANDIDATE not in attrs:
        return None
    return int(attrs[names.CANDIDATE]), int(attrs[names.SEED_INDEX])


@dataclass(frozen=True)
class RecheckContext:
    """What every re-check trial shares; the worker loop calls ``run`` and ``spent`` as it
    does a search's (pipeline.search.objective.TrialContext)."""

    trials: objective.TrialContext  # the study's: config, MLflow study run, seed, source
    candidates: tuple[tuple[int, dict], ...]  # (trial number, params), best first
    seeds: int
    resplit: bool

    @property
    def study(self):
        return self.trials.study

    @property
    def space(self) -> dict:
        return {}  # nothing is sampled: each trial's configuration is its candidate's

    def pairs(self) -> list[tuple[int, int]]:
        return [(number, i) for number, _ in self.candidates for i in range(self.seeds)]

    def plan_of(self, plan: Plan) -> Plan:
        return recheck_plan(plan, len(self.pairs()))

    def missing(self, trials: list[FrozenTrial]) -> list[tuple[int, int]]:
        """Pairs with no complete, diverged or running trial, in order."""
        taken = {_pair(t) for t in trials if t.state in TAKEN}
        return [p for p in self.pairs() if p not in taken]

    def spent(self, trials: list[FrozenTrial], n_trials: int) -> bool:
        return not any(t.state == TrialState.WAITING for t in trials) and not self.missing(trials)

    def claimed(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """Give a just-claimed trial (under the study lock) the first pair nobody holds."""
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        missing = self.missing(others)
        if missing:
            trial.set_user_attr(names.CANDIDATE, missing[0][0])
            trial.set_user_attr(names.SEED_INDEX, missing[0][1])

    def run(self, trial: optuna.Trial, client) -> tuple[TrialState, float | None]:
        pair = _pair(trial)
        if pair is None:  # a requeued trial when every pair was already taken: nothing to do
            trial.set_user_attr("pruned_reason", "no re-check pair left")
            return TrialState.PRUNED, None
        number, index = pair
        params = dict(self.candidates)[number]
        seed = rank.recheck_seed(self.trials.seed, index)
        overrides = {"seed": seed, **({"data_seed": seed} if self.resplit else {})}
        tags = {names.KIND: names.KIND_RECHECK, names.STUDY: self.trials.study_key,
                names.TRIAL_NUMBER: str(number), names.RECHECK_SEED: str(seed)}
        return objective.train_logged(
            self.trials, trial, client, f"{self.trials.study_key}-{number:03d}-recheck{index}",
            tags, params, overrides=overrides,
            logged={"trial_number": number, "recheck_seed": seed, "recheck_index": index})


@dataclass(frozen=True)
class Stage:
    """A study's re-check: its plan, its Optuna study and the context its trials share."""

    plan: Plan
    study: optuna.Study
    ctx: RecheckContext

    def verdict(self, main_trials: list[FrozenTrial]) -> dict:
        """The ranking over what the re-check ran (pipeline.search.rank)."""
        numbers = {n for n, _ in self.ctx.candidates}
        rows = [{"candidate": p[0], "seed": p[1], "value": t.value,
                 "test_acc": t.user_attrs.get("test_acc"),
                 "train_seconds": t.user_attrs.get("train_seconds"),
                 "epochs": len(t.intermediate_values)}
                for t in self.study.get_trials(deepcopy=False,
                                               states=(TrialState.COMPLETE, TrialState.PRUNED))
                if (p := _pair(t)) and p[0] in numbers and p[1] < self.ctx.seeds]
        originals = {t.number: t.value for t in main_trials if t.number in numbers}
        out = rank.rank_candidates(rows, originals, self.plan.cfg.objective.direction)
        out.update(n_runs=len(rows), seeds=self.ctx.seeds, resplit=self.ctx.resplit,
                   seconds=sum(r["train_seconds"] or 0.0 for r in rows),
                   epochs=sum(r["epochs"] for r in rows),
                   varied="weight initialisation and data order"
                          + (", and the train/validation split" if self.ctx.resplit else ""))
        out["diverged"] = sum(r["value"] is None or not math.isfinite(r["value"]) for r in rows)
        return out


def prepare(plan: Plan, storage, main_study: optuna.Study, trials_ctx) -> Stage | None:
    """Create (or resume) the study's re-check; None when the study has no completed trial."""
    rc = plan.cfg.recheck
    done = [{"number": t.number, "value": t.value, "params": t.params}
            for t in main_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    try:
        top = narrow.select_top(done, plan.cfg.objective.direction, top_k=rc.top_k)
    except narrow.NarrowingError:
        return None
    ctx = RecheckContext(trials_ctx, tuple((t["number"], dict(t["params"])) for t in top),
                         rc.seeds, rc.resplit)
    rplan = ctx.plan_of(plan)
    with storage_mod.study_lock(plan.storage, rplan.key):
        study = optuna.create_study(
            study_name=rplan.key, storage=storage, load_if_exists=True,
            direction=plan.cfg.objective.direction,
            sampler=optuna.samplers.RandomSampler(seed=plan.seed),
            pruner=optuna.pruners.NopPruner())
        if "recheck_of" not in study.user_attrs:
            study.set_user_attr("recheck_of", plan.key)
            with warnings.catch_warnings():  # experimental in Optuna; shown by the dashboard
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([plan.cfg.objective.metric])
    return Stage(rplan, study, ctx)
