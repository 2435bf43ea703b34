"""Coarse -> fine against random search, one TPE study and Hyperband: equal compute, paired seeds.

    python benchmarks/compare_search.py                  # digits and fashion-mnist, seeds 0..9
    python benchmarks/compare_search.py --datasets digits --seeds 0..19
    python benchmarks/compare_search.py --datasets fashion-mnist --n-per-class 500
    python benchmarks/compare_search.py --quick          # digits, 2 seeds, tiny budgets

Methods, run with the same ``--seed S`` for every method (paired seeds):

- coarse -> fine: the shipped pair for the dataset (digits: ``studies/coarse.yaml`` then
  ``studies/fine.yaml``; Fashion-MNIST: ``studies/fashion_coarse.yaml``, a CNN space explored
  at low fidelity, on a fifth of the training split, then ``studies/fashion_fine.yaml`` on all
  of it), the fine study's re-check included;
- random: ``RandomSampler``, no pruning, over the coarse study's space at full fidelity (the
  coarse study's settings without its ``n_per_class``): the classic method, every trial trained
  on the whole split, then the best single run;
- TPE: one TPE study (the fine study's sampler settings) with the coarse study's median pruner,
  over the same space at full fidelity;
- Hyperband: Optuna's ``HyperbandPruner`` (the pipeline's ``pruner: {name: hyperband}``:
  min_resource 1 epoch, max_resource the longest trial, reduction factor 3) over configurations
  drawn by ``--hyperband-sampler`` (default ``random``: classic Hyperband), same space.

``--n-per-class N`` (Fashion-MNIST) makes "the whole split" a class-balanced subset of N images per
class, for every method, so that 10 seeds fit in about an hour; the coarse study's own lower
fidelity shrinks in proportion (its n_per_class x N / the split's images per class). Validation
and test stay whole.

Compute is counted in training examples processed: for every trial, the epochs it ran (the
validation values it reported, ``len(trial.intermediate_values)``; pruned and failed trials count
what they ran) times the size of its study's training split (read from a trial's MLflow dataset
inputs, once per study). For each dataset and seed, coarse -> fine runs first and its two searches
spend B examples; each other method's study is then topped up, a few trials per search call,
until it has spent at least B. Each call asks for as many trials as fall short of the remainder
with a margin of 2.5 standard deviations of a prediction of their epochs (from the study's trials
so far; a study's first calls aim at 70 % of the remainder), and never fewer than
ceil(remainder / longest trial of the space), which cannot run a trial past the one that reaches
B. So a search stops with the trial that reaches B and overshoots it by less than one trial; a
trial run past that one (possible, rarely, when a call's trials run much longer than predicted)
is counted in the method's examples and reported ("past B").

Fairness: every method's winner is re-checked the same way. Coarse -> fine's fine study re-checks
its best trials over fresh seeds (in the same command; the fine study file's ``recheck``); each
other method gets the same re-check, ``python -m pipeline.recheck --study FILE --seed S --top-k K
--seeds N``, with the same fresh training seeds (they follow from the study seed S). The search
budgets are equal; the re-checks are not part of B: their examples are reported beside B for
every method.

Reported per method (mean ± standard deviation over the seeds): the best single trial's validation
accuracy; the re-checked winner's test accuracy (mean over the re-check seeds; selection is on
validation only); the examples spent until the best-so-far validation accuracy first reached
random search's final best (median and mean over the seeds where it did, and how many did, and
that as a fraction of random's own B); the search and re-check examples; and the paired
difference to random search of the first two, per seed, with a bootstrap 95 % interval of its
mean (``scipy.stats.bootstrap``, BCa, 9,999 resamples). Wall seconds and training seconds (the
trials' ``train_seconds``) are reported too.

Every search and re-check runs as ``pipeline.search.main`` / ``pipeline.recheck.main`` with
``--study FILE --seed S --workers 1 --quiet``, in-process (a command's start-up, about 10 s of
Python, PyTorch and MLflow imports and the dataset load, is paid once per seed rather than once
per call), in a temporary workspace, one Optuna journal and one MLflow SQLite store per dataset
and seed, from temporary copies of the study files. Seeds run in parallel, ``--jobs`` at a time
(default: one per usable core), each in its own process on one thread (the study files'
``threads: 1``): wall seconds are those of a machine whose every core trains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

METHODS = ("coarse -> fine", "random", "TPE", "Hyperband")
BASELINES = {"random": "random", "TPE": "tpe", "Hyperband": "hyperband"}  # method -> study name
REFERENCE = "random"
Z = 2.5  # a top-up call's margin, in standard deviations of its trials' epochs (trials_to_add)
DATASETS = ("digits", "fashion-mnist")
PAIRS = {"digits": ("coarse", "fine"), "fashion-mnist": ("fashion_coarse", "fashion_fine")}
QUICK = {"datasets": "digits", "seeds": "0,1", "digits_trials": "6,4", "recheck": "2,2"}
DEFAULTS = {"datasets": "digits,fashion-mnist", "seeds": "0..9", "digits_trials": "",
            "recheck": ""}


# -- study files ----------------------------------------------------------------------------------

@dataclass
class Setup:
    """One dataset's temporary study files and what the budget arithmetic needs."""

    dataset: str
    paths: dict[str, Path]  # study name (coarse, fine, random, tpe, hyperband) -> file
    trials: tuple[int, int]  # coarse, fine
    recheck: tuple[int, int]  # top_k, seeds
    max_epochs: int  # the longest trial of the baselines' space
    mean_epochs: float  # an unpruned trial of that space, on average (a first guess)
    n_per_class: int | None  # the subset every method's full fidelity trains on (None: all)
    coarse_per_class: int | None  # the coarse study's own lower fidelity, if any


def per_class_in_split(dataset: str) -> int:
    """Training images per class of the dataset's training split (validation held out)."""
    from pipeline.training.data import load_splits

    splits = load_splits(dataset)
    return len(splits.y_train) // splits.n_classes


def write_studies(folder: Path, dataset: str, n_per_class: int | None,
                  trials: tuple[int, int] | None, scale: float, recheck: tuple[int, int] | None,
                  hyperband_sampler: str) -> Setup:
    """coarse, fine, random, tpe and hyperband study files for one dataset, in their own folder
    (fine finds its parent there)."""
    from pipeline.config import epoch_range

    folder.mkdir(parents=True, exist_ok=True)
    coarse_name, fine_name = PAIRS[dataset]
    coarse = yaml.safe_load((_bench.STUDIES / f"{coarse_name}.yaml").read_text())
    fine = yaml.safe_load((_bench.STUDIES / f"{fine_name}.yaml").read_text())
    coarse["name"], fine["name"], fine["parent"] = "coarse", "fine", "coarse"
    low_fidelity = coarse["fixed"].pop("n_per_class", None)
    if n_per_class and low_fidelity:  # the same share of the (smaller) split
        low_fidelity = max(10, round(low_fidelity * n_per_class / per_class_in_split(dataset)))
    for raw in (coarse, fine):
        raw["dataset"] = dataset
        if n_per_class:
            raw["fixed"] = {**raw["fixed"], "n_per_class": n_per_class}
    # the baselines: the coarse space at full fidelity
    baseline = {k: v for k, v in coarse.items() if k not in ("sampler", "pruner")}
    baseline["fixed"] = dict(coarse["fixed"])
    if low_fidelity:
        coarse["fixed"] = {**coarse["fixed"], "n_per_class": low_fidelity}
    if trials:
        coarse["n_trials"], fine["n_trials"] = trials
    if scale != 1.0:  # fine narrows from coarse's 5 best and starts from its best
        coarse["n_trials"] = max(6, round(coarse["n_trials"] * scale))
        fine["n_trials"] = max(4, round(fine["n_trials"] * scale))
    if recheck:
        fine["recheck"] = {**fine.get("recheck", {}), "top_k": recheck[0], "seeds": recheck[1]}
    rc = fine.get("recheck") or {}
    top_k, seeds = rc.get("top_k", 5), rc.get("seeds", 3)
    random = {**baseline, "name": "random", "sampler": {"name": "random", "seed": 0},
              "pruner": {"name": "none"}, "description": "compare_search.py: random search"}
    tpe = {**baseline, "name": "tpe", "sampler": fine["sampler"], "pruner": coarse["pruner"],
           "description": "compare_search.py: one TPE study over the coarse space"}
    hb_sampler = ({"name": "tpe", "seed": 0} if hyperband_sampler == "tpe"
                  else {"name": "random", "seed": 0})
    hyperband = {**baseline, "name": "hyperband", "sampler": hb_sampler,
                 "pruner": {"name": "hyperband"},
                 "description": "compare_search.py: Hyperband over the coarse space"}
    paths = {}
    for raw in (coarse, fine, random, tpe, hyperband):
        paths[raw["name"]] = folder / f"{raw['name']}.yaml"
        paths[raw["name"]].write_text(yaml.safe_dump(raw, sort_keys=False))
    bounds = {k: (v["low"], v["high"]) for k, v in baseline["space"].items() if "low" in v}
    low, high = epoch_range(baseline["fixed"], bounds)
    return Setup(dataset, paths, (coarse["n_trials"], fine["n_trials"]), (top_k, seeds),
                 int(high), (low + high) / 2, n_per_class, low_fidelity)


# -- one dataset and seed ------------------------------------------------------------------------

@dataclass
class Seed:
    """The searches of one (dataset, seed): one Optuna journal, one log, their wall times."""

    tmp: Path
    dataset: str
    seed: int
    wall: dict[str, float] = field(default_factory=dict)  # method -> seconds of its calls
    calls: dict[str, int] = field(default_factory=dict)
    n_train: dict[str, int] = field(default_factory=dict)  # study key -> examples per epoch

    @property
    def storage(self) -> Path:
        return self.tmp / f"{self.dataset}-s{self.seed}.journal"

    @property
    def log(self) -> Path:
        return self.tmp / f"{self.dataset}-s{self.seed}.log"

    def command(self, method: str, module: str, study: Path, *extra: str) -> None:
        """``python -m MODULE ...``, run in this process (see the module doc)."""
        import importlib

        main = importlib.import_module(module).main
        argv = ["--study", str(study), "--seed", str(self.seed), "--storage", str(self.storage),
                "--workers", "1", "--quiet", *extra]
        t0 = time.perf_counter()
        with open(self.log, "a") as out:
            out.write(f"\n$ python -m {module} {' '.join(argv)}\n")
            out.flush()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    code = main(argv)
                except SystemExit as stop:
                    code = stop.code
        self.wall[method] = self.wall.get(method, 0.0) + time.perf_counter() - t0
        self.calls[method] = self.calls.get(method, 0) + 1
        if code != 0:
            tail = self.log.read_text()[-3000:]
            raise SystemExit(f"python -m {module} {' '.join(argv)}: exit code {code}; the log "
                             f"ends:\n{tail}")

    def search(self, method: str, study: Path, n_trials: int | None = None) -> None:
        extra = ("--n-trials", str(n_trials)) if n_trials is not None else ()
        self.command(method, "pipeline.search.cli", study, *extra)

    def recheck(self, method: str, study: Path, top_k: int, seeds: int) -> None:
        self.command(method, "pipeline.recheck", study, "--top-k", str(top_k),
                     "--seeds", str(seeds))

    def trials(self, key: str) -> list:
        """The study's complete, pruned and failed trials, in number order."""
        import optuna
        from optuna.trial import TrialState

        study = optuna.load_study(study_name=key, storage=_bench.open_journal(self.storage))
        return sorted((t for t in study.get_trials(deepcopy=False) if t.state in (
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)), key=lambda t: t.number)

    def examples_per_epoch(self, key: str, trials) -> int:
        """The study's training-split size, from one of its trials' MLflow dataset inputs."""
        if key not in self.n_train:
            self.n_train[key] = n_train_of(next(t for t in trials
                                                if "mlflow_run_id" in t.user_attrs))
        return self.n_train[key]


def epochs(trials) -> int:
    return sum(len(t.intermediate_values) for t in trials)


def train_seconds(trials) -> float:
    return sum(t.user_attrs.get("train_seconds", 0.0) for t in trials)


def n_train_of(trial) -> int:
    """Training examples per epoch, from the trial's MLflow run (its dataset inputs)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
    for item in run.inputs.dataset_inputs:
        if item.dataset.name.endswith("-train"):
            return int(json.loads(item.dataset.profile)["num_rows"])
    raise SystemExit(f"trial {trial.number}: no training split among its MLflow inputs")


def search_trace(trials, per_epoch: list[int], budget: int | None = None) -> dict:
    """Walk the trials in order (``per_epoch``: each one's training examples per epoch): best
    complete trial, examples spent, best-so-far curve (examples spent after each trial, best value
    so far); the trials run after the one that reached ``budget`` examples are counted in
    ``past_budget``."""
    spent, best, curve, crossed = 0, None, [], None
    for i, (t, n) in enumerate(zip(trials, per_epoch, strict=True)):
        spent += len(t.intermediate_values) * n
        if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value) and (
                best is None or t.value > best.value):
            best = t
        curve.append((spent, best.value if best else -math.inf))
        if budget is not None and crossed is None and spent >= budget:
            crossed = i
    if best is None:
        raise SystemExit("a search finished without a completed trial")
    return {"best_val": best.value, "best_test": best.user_attrs.get("test_acc"),
            "best_number": best.number, "examples": spent, "epochs": epochs(trials),
            "trials": len(trials),
            "past_budget": 0 if crossed is None else len(trials) - 1 - crossed,
            "train_s": train_seconds(trials), "curve": curve}


def recheck_trace(s: Seed, key: str, top_k: int, seeds: int, originals: dict[int, float],
                  per_epoch: int) -> dict:
    """The re-check's verdict, recomputed from the journal as the pipeline does
    (pipeline.search.rank): the winner's mean validation and test accuracy over the seeds."""
    from pipeline import names
    from pipeline.search import rank

    runs = s.trials(f"{key}-recheck")
    rows = [{"candidate": int(t.user_attrs[names.CANDIDATE]),
             "seed": int(t.user_attrs[names.SEED_INDEX]), "value": t.value,
             "test_acc": t.user_attrs.get("test_acc")}
            for t in runs if t.state.name == "COMPLETE" and names.CANDIDATE in t.user_attrs
            and int(t.user_attrs[names.SEED_INDEX]) < seeds]
    verdict = rank.rank_candidates(rows, originals, "maximize")
    if verdict["winner"] is None or len(verdict["ranking"]) > top_k:
        raise SystemExit(f"{key}: {len(verdict['ranking'])} re-checked candidates, expected 1 "
                         f"to {top_k}")
    win = verdict["ranking"][0]
    return {"winner": win["candidate"], "val_mean": win["val_mean"],
            "test_mean": win["test_mean"], "optimism": win["optimism"],
            "candidates": len(verdict["ranking"]), "runs": len(rows),
            "examples": epochs(runs) * per_epoch, "train_s": train_seconds(runs)}


def trials_to_add(remaining: int, own: list[int], setup: Setup) -> int:
    """How many trials the next top-up call asks for, ``remaining`` epochs short of the budget:
    the most trials k + 1 such that k trials fall short of it (of 70 % of it while the study has
    fewer than 10 trials of its own) by Z standard deviations of a prediction of their sum, and
    never fewer than ceil(remaining / longest trial), which cannot run a trial past the one that
    reaches it. Epochs per trial: the study's own trials, else the space's average; the
    prediction of the sum of k trials from n has variance sd^2 (k + k^2 / n)."""
    sure = max(1, math.ceil(remaining / setup.max_epochs))
    if own:
        mu, n = statistics.fmean(own), min(len(own), 30)
        sd = statistics.pstdev(own) if len(own) > 1 else 0.0
    else:
        mu, n, sd = setup.mean_epochs, 3, 0.0
    mu, sd = max(mu, 1.0), max(sd, 0.25 * setup.max_epochs)
    target = remaining * (0.7 if len(own) < 10 else 1.0)
    k = 0
    while (k + 1) * mu + Z * sd * math.sqrt((k + 1) + (k + 1) ** 2 / n) <= target:
        k += 1
    return max(sure, k + 1)


def top_up(s: Seed, method: str, path: Path, key: str, budget: int, setup: Setup) -> list:
    """Top the study up, call by call, until its trials have spent at least ``budget`` epochs
    (see the module docstring); its trials."""
    trials: list = []
    while (spent := epochs(trials)) < budget:
        finished = sum(t.state.name != "FAIL" for t in trials)  # failed trials are replaced
        own = [len(t.intermediate_values) for t in trials]
        s.search(method, path, finished + trials_to_add(budget - spent, own, setup))
        trials = s.trials(key)
    return trials


def one_seed(tmp: Path, setup: Setup, seed: int) -> dict:
    """Every method on one (dataset, seed), in this process; its results by method."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/{setup.dataset}-s{seed}.db"
    s = Seed(tmp, setup.dataset, seed)
    top_k, n_seeds = setup.recheck
    out = {}
    # coarse -> fine: both searches, and fine's own re-check
    s.search("coarse -> fine", setup.paths["coarse"])
    s.search("coarse -> fine", setup.paths["fine"])
    coarse, fine = s.trials("coarse"), s.trials("fine")
    full = s.examples_per_epoch("fine", fine)  # every baseline trains at fine's fidelity
    per_epoch = ([s.examples_per_epoch("coarse", coarse)] * len(coarse) + [full] * len(fine))
    out["coarse -> fine"] = {**search_trace(coarse + fine, per_epoch), "recheck": recheck_trace(
        s, "fine", top_k, n_seeds, {t.number: t.value for t in fine}, full),
        "stages": [len(coarse), len(fine)], "n_train": [per_epoch[0], full]}
    budget = out["coarse -> fine"]["examples"]
    for method, key in BASELINES.items():
        trials = top_up(s, method, setup.paths[key], key, math.ceil(budget / full), setup)
        s.recheck(method, setup.paths[key], top_k, n_seeds)
        out[method] = {**search_trace(trials, [full] * len(trials), budget),
                       "recheck": recheck_trace(s, key, top_k, n_seeds,
                                                {t.number: t.value for t in trials}, full)}
    target = out[REFERENCE]["best_val"]
    for method, r in out.items():
        r["reach"] = next((e for e, best in r["curve"] if best >= target - 1e-12), None)
        r["wall"], r["calls"] = s.wall[method], s.calls[method]
        r.pop("curve")
    return out


def _one_seed_job(job: tuple) -> tuple:
    """A worker process's job: one (dataset, seed), logged to its own file."""
    tmp, setup, seed = job
    t0 = time.perf_counter()
    result = one_seed(tmp, setup, seed)
    return setup.dataset, seed, result, time.perf_counter() - t0


# -- statistics and tables ------------------------------------------------------------------------

def bootstrap_ci(diffs: list[float]) -> tuple[float, float]:
    """95 % bootstrap interval (BCa) of the mean paired difference; percentile when BCa cannot be
    computed (very few seeds); the value itself when every difference is the same."""
    import numpy as np
    from scipy import stats

    if len(diffs) < 2:
        return math.nan, math.nan
    if max(diffs) - min(diffs) < 1e-15:
        return diffs[0], diffs[0]
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = stats.bootstrap((np.asarray(diffs),), np.mean, n_resamples=9999,
                                 confidence_level=0.95, method=method,
                                 rng=np.random.default_rng(0)).confidence_interval
        if math.isfinite(ci.low) and math.isfinite(ci.high):
            return float(ci.low), float(ci.high)
    return math.nan, math.nan


def mean_sd(values, digits: int = 4) -> str:
    mean, sd = _bench.mean_std(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def examples(values) -> str:
    """Training examples, mean ± standard deviation, in k or M."""
    mean, sd = _bench.mean_std(values)
    unit, div = ("M", 1e6) if mean >= 1e6 else ("k", 1e3)
    digits = 2 if unit == "M" else 0
    return f"{mean / div:.{digits}f} ± {sd / div:.{digits}f} {unit}"


def paired(values: list[float], reference: list[float]) -> tuple[str, dict]:
    diffs = [a - b for a, b in zip(values, reference)]
    low, high = bootstrap_ci(diffs)
    mean = statistics.fmean(diffs)
    text = f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]" if math.isfinite(low) else f"{mean:+.4f}"
    return text, {"mean": mean, "ci_low": low, "ci_high": high, "diffs": diffs}


def dataset_label(setup: Setup, n_train: int | None) -> str:
    n = f"{n_train:,} training images" if n_train else "?"
    low = (f"; coarse at {setup.coarse_per_class}/class" if setup.coarse_per_class else "")
    if setup.n_per_class:
        return f"{setup.dataset} ({setup.n_per_class}/class: {n}{low}; val, test whole)"
    return f"{setup.dataset} ({n}{low})"


def reach_fraction(row: dict, reference: dict) -> float:
    """Examples a method spent to reach random's best, as a fraction of what random spent
    (inf: never reached)."""
    return row["reach"] / reference["examples"] if row["reach"] is not None else math.inf


def summarize(results: dict, seeds: list[int]) -> dict:
    """Per dataset and method: the table's cells and the paired differences."""
    out = {}
    for dataset, by_seed in results.items():
        ref = [by_seed[s][REFERENCE] for s in seeds]
        out[dataset] = {}
        for method in METHODS:
            rows = [by_seed[s][method] for s in seeds]
            vals = [r["best_val"] for r in rows]
            tests = [r["recheck"]["test_mean"] for r in rows]
            reached = [r["reach"] for r in rows if r["reach"] is not None]
            fractions = [reach_fraction(r, f) for r, f in zip(rows, ref, strict=True)]
            median = statistics.median(fractions)
            cell = {"best_val": mean_sd(vals), "test": mean_sd(tests),
                    "reach": (f"{examples(reached)} ({len(reached)}/{len(rows)})" if reached
                              else f"never (0/{len(rows)})"),
                    "reach_fraction": median,
                    "reach_median": "never" if math.isinf(median) else f"{median:.2f}",
                    "search": examples([r["examples"] for r in rows]),
                    "recheck": examples([r["recheck"]["examples"] for r in rows]),
                    "wall": f"{statistics.fmean(r['wall'] for r in rows):.0f}",
                    "train_s": (f"{statistics.fmean(r['train_s'] for r in rows):.0f} + "
                                f"{statistics.fmean(r['recheck']['train_s'] for r in rows):.0f}")}
            if method != REFERENCE:
                cell["d_val"], cell["d_val_stats"] = paired(vals, [r["best_val"] for r in ref])
                cell["d_test"], cell["d_test_stats"] = paired(
                    tests, [r["recheck"]["test_mean"] for r in ref])
            else:
                cell["d_val"] = cell["d_test"] = "(reference)"
            out[dataset][method] = cell
    return out


def print_tables(results: dict, summary: dict, setups: dict[str, Setup], n_train: dict,
                 seeds: list[int]) -> None:
    top_k, n_seeds = next(iter(setups.values())).recheck
    print(f"\n{len(seeds)} paired seeds ({', '.join(map(str, seeds))}); mean ± sd over seeds; "
          f"Δ: paired difference to random search, mean [bootstrap 95 % interval]; every "
          f"method's winner re-checked ({top_k} best x {n_seeds} fresh seeds); search budget B = "
          "coarse -> fine's training examples (coarse + fine)\n")
    print("| dataset | method | best val acc | Δ val vs random | re-checked winner test acc | "
          "Δ test vs random | examples to reach random's best (seeds that did) | ... as a "
          "share of random's, median | search examples | re-check examples | wall s / seed | "
          "train s / seed (search + re-check) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dataset, cells in summary.items():
        label = dataset_label(setups[dataset], n_train.get(dataset))
        for method in METHODS:
            c = cells[method]
            print(f"| {label} | {method} | {c['best_val']} | {c['d_val']} | {c['test']} | "
                  f"{c['d_test']} | {c['reach']} | {c['reach_median']} | {c['search']} | "
                  f"{c['recheck']} | {c['wall']} | {c['train_s']} |")
    print("\nper seed: best val / re-checked winner's test / search examples (k) / examples to "
          "reach random's best (k) (trials; calls), wall seconds\n")
    print("| dataset | seed | " + " | ".join(METHODS) + " |")
    print("|---|---:|" + "---|" * len(METHODS))
    for dataset, by_seed in results.items():
        for s in seeds:
            cells = []
            for method in METHODS:
                r = by_seed[s][method]
                reach = f"{r['reach'] / 1e3:.0f}" if r["reach"] is not None else "never"
                past = f", {r['past_budget']} past B" if r["past_budget"] else ""
                cells.append(f"{r['best_val']:.4f} / {r['recheck']['test_mean']:.4f} / "
                             f"{r['examples'] / 1e3:.0f} / {reach} ({r['trials']}; "
                             f"{r['calls']}{past}), {r['wall']:.0f} s")
            print(f"| {dataset} | {s} | " + " | ".join(cells) + " |")


# -- command line ---------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """``0..9`` (inclusive), ``0,1,2`` or both: ``0..4,10``."""
    seeds = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("..")
        seeds += list(range(int(low), int(high) + 1)) if sep else [int(part)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds {text!r}: give distinct seeds, e.g. 0..9")
    return seeds


def parse_pair(text: str, what: str) -> tuple[int, int] | None:
    if not text:
        return None
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: give two positive counts, e.g. 12,8")
    return parts[0], parts[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated, of {', '.join(DATASETS)} (default: both)")
    p.add_argument("--seeds", default=None, help="paired seeds: 0..9 (default), 0,1,2, 0..4,10")
    p.add_argument("--n-per-class", type=int, default=500,
                   help="fashion-mnist: class-balanced training subset, images per class "
                        "(0: the whole training split; validation and test stay full)")
    p.add_argument("--digits-trials", default=None,
                   help="digits coarse,fine trial counts (default: the study files', 24,16)")
    p.add_argument("--fashion-trials", default=None,
                   help="fashion-mnist coarse,fine trial counts (default: the study files')")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="seeds run at once, each in its own process on one core (default: one "
                        "per usable core)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the coarse and fine trial counts, hence the search budget B")
    p.add_argument("--recheck", default=None,
                   help="top_k,seeds of every method's re-check (default: fine.yaml's, 5,3)")
    p.add_argument("--hyperband-sampler", choices=("random", "tpe"), default="random",
                   help="configurations Hyperband draws (random: classic Hyperband)")
    p.add_argument("--quick", action="store_true",
                   help="check that the script works: digits, seeds 0,1, coarse 6 and fine 4 "
                        "trials, re-check 2 x 2")
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.seeds = parse_seeds(args.seeds)
        digits_trials = parse_pair(args.digits_trials, "--digits-trials")
        fashion_trials = parse_pair(args.fashion_trials, "--fashion-trials")
        recheck = parse_pair(args.recheck, "--recheck")
    except (ValueError, argparse.ArgumentTypeError) as err:
        p.error(str(err))
    if recheck and recheck[1] < 2:
        p.error("--recheck: at least 2 seeds")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if unknown := set(datasets) - set(DATASETS):
        p.error(f"unknown datasets {sorted(unknown)}")
    if args.scale <= 0:
        p.error("--scale must be positive")

    if args.jobs < 1:
        p.error("--jobs must be at least 1")

    print(f"python {sys.version.split()[0]}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start; {' '.join(sys.argv)}")
    print(_bench.code_state(), flush=True)
    results: dict = {d: {} for d in datasets}
    setups: dict[str, Setup] = {}
    seconds: dict[str, list[float]] = {d: [] for d in datasets}
    with _bench.workspace("bench-compare-", keep=args.keep) as tmp, _bench.CpuMeter() as cpu:
        for dataset in datasets:
            fashion = dataset == "fashion-mnist"
            setup = setups[dataset] = write_studies(
                tmp / f"studies-{dataset}", dataset,
                (args.n_per_class or None) if fashion else None,
                fashion_trials if fashion else digits_trials, args.scale, recheck,
                args.hyperband_sampler)
            print(f"{dataset}: coarse {setup.trials[0]} + fine {setup.trials[1]} trials, "
                  f"re-check {setup.recheck[0]} x {setup.recheck[1]}"
                  + (f", {setup.n_per_class} training images per class" if setup.n_per_class
                     else "")
                  + (f", coarse on {setup.coarse_per_class} per class" if setup.coarse_per_class
                     else ""), flush=True)
        jobs = [(tmp, setups[d], seed) for d in datasets for seed in args.seeds]
        # spawn: each job is a fresh process, as a command is (this one has imported torch)
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs)),
                                                       maxtasksperchild=1) as pool:
            for dataset, seed, res, secs in pool.imap_unordered(_one_seed_job, jobs):
                results[dataset][seed] = res
                seconds[dataset].append(secs)
                print(f"{dataset} seed {seed} ({secs:.0f} s): " + "; ".join(
                    f"{m}: best val {r['best_val']:.4f}, re-checked test "
                    f"{r['recheck']['test_mean']:.4f}, {r['examples'] / 1e3:.0f}k examples "
                    f"({r['trials']} trials, {r['calls']} calls"
                    + (f", {r['past_budget']} past B" if r["past_budget"] else "")
                    + f"), {r['wall']:.0f} s"
                    for m, r in res.items()) + f"; load average {os.getloadavg()[0]:.2f}",
                    flush=True)
    n_train = {d: next(iter(by_seed.values()))["coarse -> fine"]["n_train"][1]
               for d, by_seed in results.items()}
    summary = summarize(results, args.seeds)
    print_tables(results, summary, setups, n_train, args.seeds)
    print()
    for dataset, secs in seconds.items():
        runs = [r for res in results[dataset].values() for r in res.values()]
        n = len(args.seeds)
        print(f"{dataset}: {n} seeds, {statistics.median(secs):.0f} s per seed (median), of "
              f"which {sum(r['train_s'] + r['recheck']['train_s'] for r in runs) / n:.0f} s "
              f"training, in {sum(r['calls'] for r in runs) / n:.1f} search calls")
    print(f"whole benchmark: {cpu.seconds / 60:.1f} min, {args.jobs} seeds at a time; "
          f"{cpu.describe()}")
    if args.json:
        args.json.write_text(json.dumps({
            "argv": sys.argv, "seeds": args.seeds, "results": results,
            "summary": summary, "n_train": n_train}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
