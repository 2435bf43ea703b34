"""What the re-check buys: how noisy one run is, and how often re-checking changes the winner.

    python benchmarks/recheck.py noise --dataset digits --repeats 8
    python benchmarks/recheck.py noise --dataset fashion-mnist --repeats 5
    python benchmarks/recheck.py effect --dataset digits --seeds 0,1,2,3,4
    python benchmarks/recheck.py effect --dataset fashion-mnist --seeds 0,1,2,3,4

``noise``: one fixed configuration (the digits fine winner's shape; on Fashion-MNIST a
784-256-128 MLP) trained ``--repeats`` times with (a) only the training seed varied (weight
initialisation, data order) and (b) the training seed and the train/validation split
(``data_seed``) varied. The spread of validation accuracy under each says which noise dominates,
and so whether a re-check should re-split (``recheck: {resplit: true}``).

``effect``: for each sampler seed, a search with a re-check (``studies/fine.yaml``'s chain on
digits, the coarse -> fine quickstart; on Fashion-MNIST a short study over the coarse space on the
full training set, see EFFECT_STUDY), then from the study run: whether the re-checked winner is
the single-run best, the selection optimism, and both models' test accuracy. Every study runs in
a temporary folder (its own journal and MLflow store) through the real command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, STUDIES, workspace  # noqa: E402

NOISE_CONFIG = {
    "digits": ["--depth", "3", "--width", "189", "--l2-lambda", "0.014", "--eta-min", "1.2e-5",
               "--eta-max", "0.118", "--cycles", "5", "--step-size-epochs", "2",
               "--batch-size", "32", "--batch-norm"],
    "fashion-mnist": ["--depth", "2", "--width", "256", "--l2-lambda", "1e-4", "--eta-min",
                      "1e-4", "--eta-max", "0.1", "--cycles", "1", "--step-size-epochs", "2",
                      "--batch-size", "128", "--batch-norm"],
}

# Fashion-MNIST (48,000 training images): the coarse space, 2-epoch trials, 12 trials, re-check
# of the 3 best over 3 seeds. Short enough for five sampler seeds in minutes on two cores.
EFFECT_STUDY = """
name: rc_fmnist
dataset: fashion-mnist
objective: {metric: val_acc, direction: maximize}
sampler: {name: tpe, seed: 0, options: {n_startup_trials: 6}}
n_trials: 12
fixed: {arch: mlp, activation: relu, batch_norm: true, threads: 2, optimizer: sgd,
        schedule: cyclical, batch_size: 128, step_size_epochs: 1, cycles: 1}
space:
  l2_lambda: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
  eta_max:   {type: float, low: 1.0e-3, high: 1.0,    log: true}
  depth:     {type: int,   low: 1,      high: 3}
  width:     {type: int,   low: 32,     high: 512,    log: true}
recheck: {top_k: 3, seeds: 3}
"""


def _python(*argv: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def noise(dataset: str, repeats: int) -> dict:
    from mlflow.tracking import MlflowClient

    out = {}
    with workspace("recheck-noise-") as tmp:
        for label, vary_split in (("training seed only", False), ("seed + split", True)):
            vals, tests = [], []
            for i in range(repeats):
                seed = 1000 + i
                argv = ["-m", "pipeline.train", "--dataset", dataset, "--seed", str(seed),
                        "--threads", "2", *NOISE_CONFIG[dataset],
                        *(["--data-seed", str(seed)] if vary_split else [])]
                line = _python(*argv, cwd=tmp).strip().splitlines()[-1]
                run_id = line.split()[1].rstrip(":")
                m = MlflowClient().get_run(run_id).data.metrics
                vals.append(m["best_val_acc"])
                tests.append(m["test_acc"])
            out[label] = {"val_mean": statistics.fmean(vals), "val_std": statistics.stdev(vals),
                          "test_mean": statistics.fmean(tests),
                          "test_std": statistics.stdev(tests), "n": repeats}
            print(f"{dataset} {label}: val {out[label]['val_mean']:.4f} ± "
                  f"{out[label]['val_std']:.4f}, test {out[label]['test_mean']:.4f} ± "
                  f"{out[label]['test_std']:.4f} (n={repeats})", flush=True)
    return out


def effect(dataset: str, seeds: list[int]) -> list[dict]:
    from mlflow.tracking import MlflowClient

    rows = []
    for seed in seeds:
        with workspace("recheck-effect-") as tmp:
            if dataset == "digits":
                _python("-m", "pipeline.search", "--study", str(STUDIES / "coarse.yaml"),
                        "--seed", str(seed), "--quiet", cwd=tmp)
                _python("-m", "pipeline.search", "--study", str(STUDIES / "fine.yaml"),
                        "--seed", str(seed), "--quiet", cwd=tmp)
                key = "fine"
            else:
                (tmp / "rc_fmnist.yaml").write_text(EFFECT_STUDY)
                _python("-m", "pipeline.search", "--study", str(tmp / "rc_fmnist.yaml"),
                        "--seed", str(seed), "--quiet", cwd=tmp)
                key = "rc_fmnist"
            client = MlflowClient()
            (run,) = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                f"tags.`pipeline.study` = '{key}' and tags.`pipeline.kind` = 'study'")
            m, tags = run.data.metrics, run.data.tags
            verdict = json.loads(Path(client.download_artifacts(run.info.run_id, "recheck.json",
                                                                str(tmp))).read_text())
            best = int(m["best_trial"])
            by = {r["candidate"]: r for r in verdict["ranking"]}
            row = {"seed": seed, "single_best": best, "winner": int(tags["pipeline.winner_trial"]),
                   "changed": int(tags["pipeline.winner_trial"]) != best,
                   "optimism": m["selection_optimism"],
                   "single_best_optimism": by[best]["optimism"] if best in by else None,
                   "single_best_test_single_run": m.get("test_acc"),
                   "single_best_test_recheck_mean": by[best]["test_mean"] if best in by else None,
                   "winner_test_mean": m["winner_test_mean"],
                   "distinguishable": verdict.get("difference", {}).get("distinguishable")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    changed = sum(r["changed"] for r in rows)
    print(f"\n{dataset}: the re-check changed the winner in {changed} of {len(rows)} seeds; "
          f"mean selection optimism of the single-run best "
          f"{statistics.fmean(r['single_best_optimism'] for r in rows):+.4f}, of the re-checked "
          f"winner {statistics.fmean(r['optimism'] for r in rows):+.4f}; mean test accuracy "
          f"(over the re-check seeds): single-run best "
          f"{statistics.fmean(r['single_best_test_recheck_mean'] for r in rows):.4f}, re-checked "
          f"winner {statistics.fmean(r['winner_test_mean'] for r in rows):.4f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("noise", "effect"))
    p.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2,3,4")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; {' '.join(sys.argv)}", flush=True)
    if args.what == "noise":
        noise(args.dataset, args.repeats)
    else:
        effect(args.dataset, [int(s) for s in args.seeds.split(",")])


if __name__ == "__main__":
    main()
