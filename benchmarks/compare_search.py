"""Coarse -> fine against plain random search and a single TPE study, at equal training budget.

    python benchmarks/compare_search.py                                   # about 20-30 minutes
    python benchmarks/compare_search.py --datasets digits --seeds 0,1,2,3,4
    python benchmarks/compare_search.py --datasets fashion-mnist --n-per-class 300 \
        --fashion-trials 16,8

Methods, each over the coarse study's space (``studies/coarse.yaml``) and seeded with ``--seed``:

- coarse -> fine: the shipped ``coarse`` study, then the shipped ``fine`` study (QMC with the
  median pruner, then TPE on the narrowed space with longer training, seeded with coarse's best);
- random: ``RandomSampler``, no pruning (the classic method);
- TPE: one TPE study (``studies/fine.yaml``'s sampler settings) with the coarse study's median
  pruner.

Budget = epochs trained: the sum over trials of ``len(trial.intermediate_values)`` (every trial
reports validation accuracy once per epoch; pruned trials count the epochs they ran). For each
dataset and seed, coarse -> fine runs first and spends B epochs; random and TPE then run until
they have spent at least B (the study is topped up with more trials until it has; trials are
counted in order up to the one that crosses B, and later ones are ignored). "Epochs to reach
random's best" is the budget a method spent until its best-so-far validation accuracy first
reached random search's final best, or "never". A method's best is its best completed trial
(for coarse -> fine, over both stages; ties go to the earlier trial); its test accuracy is that
trial's (selection is on validation only).

Fashion-MNIST uses a class-balanced training subset (``n_per_class`` images per class; validation
and test stay full) and fewer coarse/fine trials (``--fashion-trials``); digits uses the study
files' trial counts. Temporary study files (copies of the shipped ones with the dataset, subset
and sampler changed) live in a temporary folder with the journals and the MLflow store.
Training uses ``--torch-threads`` threads (default 1): this benchmark counts epochs, not
seconds, and one thread is much faster than two on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

METHODS = ("coarse -> fine", "random", "TPE")


def write_studies(folder: Path, dataset: str, n_per_class: int | None,
                  trials: tuple[int, int] | None) -> dict[str, Path]:
    """coarse, fine, random and tpe study files for one dataset, in their own folder (fine
    finds its parent there)."""
    folder.mkdir(parents=True, exist_ok=True)
    coarse = yaml.safe_load((_bench.STUDIES / "coarse.yaml").read_text())
    fine = yaml.safe_load((_bench.STUDIES / "fine.yaml").read_text())
    for raw in (coarse, fine):
        raw["dataset"] = dataset
        if n_per_class:
            raw["fixed"] = {**raw["fixed"], "n_per_class": n_per_class}
    if trials:
        coarse["n_trials"], fine["n_trials"] = trials
    random = {**coarse, "name": "random", "sampler": {"name": "random", "seed": 0},
              "pruner": {"name": "none"}, "description": "compare_search.py: random search"}
    tpe = {**coarse, "name": "tpe", "sampler": fine["sampler"],
           "description": "compare_search.py: one TPE study over the coarse space"}
    paths = {}
    for raw in (coarse, fine, random, tpe):
        paths[raw["name"]] = folder / f"{raw['name']}.yaml"
        paths[raw["name"]].write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def run(path: Path, storage: str, seed: int, n_trials: int | None, log: Path) -> list:
    """Run (or top up) one study in this process; its finished trials in order."""
    import optuna

    from pipeline.search.cli import SearchOptions
    from pipeline.search.engine import run_study

    opts = SearchOptions(study=str(path), n_trials=n_trials, seed=seed, storage=storage,
                         quiet=True)
    with open(log, "a") as out, contextlib.redirect_stdout(out):
        code = run_study(opts)
    if code != 0:
        raise SystemExit(f"{path.name}: exit code {code}; see {log}")
    name = yaml.safe_load(path.read_text())["name"]
    return _bench.finished_trials(optuna.load_study(study_name=name,
                                                    storage=_bench.open_journal(storage)))


def run_to_budget(path: Path, storage: str, seed: int, budget: int, log: Path) -> tuple:
    """Top a study up until its trials have spent at least `budget` epochs."""
    n = max(8, math.ceil(budget / 10))  # a first guess: coarse-space trials average ~10 epochs
    while True:
        trials = run(path, storage, seed, n, log)
        spent = sum(len(t.intermediate_values) for t in trials)
        if spent >= budget:
            return trials, len(trials)
        per_trial = spent / len(trials)
        n = len(trials) + math.ceil((budget - spent) / per_trial) + 2


def trace(trials: list, budget: int | None = None) -> dict:
    """Walk trials in order up to the budget: best trial, epochs spent, best-so-far curve."""
    spent, best, curve, used = 0, None, [], 0
    for t in trials:
        if budget is not None and spent >= budget:
            break
        spent += len(t.intermediate_values)
        used += 1
        if t.state.name == "COMPLETE" and (best is None or t.value > best.value):
            best = t
        curve.append((spent, best.value if best else -1.0))
    return {"best_val": best.value, "test": best.user_attrs["test_acc"], "epochs": spent,
            "trials": used, "curve": curve, "best_number": best.number}


def epochs_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((spent for spent, best in curve if best >= target - 1e-12), None)


def one_seed(tmp: Path, dataset: str, seed: int, studies: dict[str, Path]) -> dict:
    storage = str(tmp / f"{dataset}-s{seed}.journal")
    log = tmp / f"{dataset}-s{seed}.log"
    t0 = time.perf_counter()
    coarse = run(studies["coarse"], storage, seed, None, log)
    fine = run(studies["fine"], storage, seed, None, log)
    cf = trace(coarse + fine)
    budget = cf["epochs"]
    t_cf = time.perf_counter() - t0
    out = {"coarse -> fine": cf}
    seconds = {"coarse -> fine": t_cf}
    ran = {"coarse -> fine": len(coarse) + len(fine)}
    for method, key in (("random", "random"), ("TPE", "tpe")):
        t0 = time.perf_counter()
        trials, ran[method] = run_to_budget(studies[key], storage, seed, budget, log)
        out[method] = trace(trials, budget)
        seconds[method] = time.perf_counter() - t0
    target = out["random"]["best_val"]
    for method, r in out.items():
        r["reach"] = epochs_to_reach(r["curve"], target)
        r["seconds"] = seconds[method]
        r["ran"] = ran[method]
    return out


def fmt_ms(values: list[float], digits: int = 4) -> str:
    mean, std = _bench.mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def print_table(results: dict, args) -> None:
    """results[dataset][seed][method] -> trace."""
    seeds = args.seeds
    print(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean ± std over seeds; "
          f"budget B = coarse -> fine's epochs; torch {args.torch_threads} thread(s)\n")
    print("| dataset | method | best val acc | its test acc | epochs spent | trials counted "
          "(run) | epochs to reach random's best | reached |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dataset, by_seed in results.items():
        label = dataset if dataset == "digits" else (
            f"{dataset} ({args.n_per_class}/class train subset; val, test full)")
        for method in METHODS:
            rows = [by_seed[s][method] for s in seeds]
            reached = [r["reach"] for r in rows if r["reach"] is not None]
            reach = (fmt_ms(reached, 0) if reached else "never")
            print(f"| {label} | {method} | {fmt_ms([r['best_val'] for r in rows])} | "
                  f"{fmt_ms([r['test'] for r in rows])} | "
                  f"{fmt_ms([r['epochs'] for r in rows], 0)} | "
                  f"{fmt_ms([r['trials'] for r in rows], 1)} "
                  f"({sum(r['ran'] for r in rows)}) | {reach} | {len(reached)}/{len(rows)} |")
    print("\nper seed: best val / test / epochs spent / epochs to reach random's best "
          "(trials counted), wall seconds\n")
    print("| dataset | seed | " + " | ".join(METHODS) + " |")
    print("|---|---:|" + "---|" * len(METHODS))
    for dataset, by_seed in results.items():
        for s in seeds:
            cells = []
            for method in METHODS:
                r = by_seed[s][method]
                reach = r["reach"] if r["reach"] is not None else "never"
                cells.append(f"{r['best_val']:.4f} / {r['test']:.4f} / {r['epochs']} / {reach} "
                             f"({r['trials']}), {r['seconds']:.0f} s")
            print(f"| {dataset} | {s} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated sampler seeds")
    parser.add_argument("--datasets", default="digits,fashion-mnist",
                        help="comma-separated: digits, fashion-mnist")
    parser.add_argument("--n-per-class", type=int, default=500,
                        help="fashion-mnist training images per class")
    parser.add_argument("--fashion-trials", default="12,8",
                        help="fashion-mnist coarse,fine trial counts")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    datasets = [d for d in args.datasets.split(",") if d.strip()]
    unknown = set(datasets) - {"digits", "fashion-mnist"}
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}")
    fashion_trials = tuple(int(x) for x in args.fashion_trials.split(","))

    import torch

    torch.set_num_threads(args.torch_threads)
    print(f"python {sys.version.split()[0]}, {len(os.sched_getaffinity(0))} cores, torch "
          f"{torch.get_num_threads()} thread(s), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    print(_bench.code_state())
    results: dict = {}
    with _bench.workspace("bench-compare-", keep=args.keep) as tmp, _bench.CpuMeter() as cpu:
        for dataset in datasets:
            fashion = dataset == "fashion-mnist"
            studies = write_studies(tmp / f"studies-{dataset}", dataset,
                                    args.n_per_class if fashion else None,
                                    fashion_trials if fashion else None)
            results[dataset] = {}
            for seed in args.seeds:
                res = one_seed(tmp, dataset, seed, studies)
                results[dataset][seed] = res
                print(f"{dataset} seed {seed}: " + "; ".join(
                    f"{m} best val {r['best_val']:.4f} test {r['test']:.4f} in {r['epochs']} "
                    f"epochs ({r['trials']} trials, {r['seconds']:.0f} s)"
                    for m, r in res.items()) + f"; load average {os.getloadavg()[0]:.2f}",
                    flush=True)
    print_table(results, args)
    print(f"\nwhole benchmark: {cpu.seconds / 60:.1f} min; {cpu.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
