"""A study's final run: its winner retrained longer on train + validation, tested once.

    python -m pipeline.final --study fine                    # fine's best trial, twice as long
    python -m pipeline.final --study fine --length-factor 3  # three times as long
    python -m pipeline.final --study coarse --smoke          # the winner of coarse's smoke study

The winner is the study's re-checked winner when it has one (the best mean validation over fresh
seeds, pipeline.search.recheck), else its best trial, chosen on validation when the study ran
(both read from MLflow, pipeline.search.winner). Its exact configuration (seed included) is
trained again on the training and validation splits together, for ``length-factor`` times as
long: cycles x N for a cyclical schedule (so it still ends a cycle, at the lowest rate), epochs
x N for a constant one. Nothing is held out for selection any more, so the model kept is the
last epoch's; the test split, untouched by the search, is evaluated exactly once, at the end.
It is one run, so it trains on every usable core (the trials shared them with other workers).

The run is a child of the study's run, named ``<study>-final`` and tagged
``pipeline.kind=final``; it logs the configuration, per-epoch training metrics, ``test_acc``,
the weights and the example grids, and records which trial it retrains. Exit codes: 0 done, 2
bad input (study file, no finished study in the store, dataset, store).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import names
from pipeline.cli import EXIT_BAD_INPUT, positive, str_or_none
from pipeline.config import ConfigError, TrainConfig, make_train_config

LENGTH_FACTOR = 2  # a search keeps trials short to afford many; one final run can train longer


def final_config(trial_config: dict, length_factor: int, threads: int) -> TrainConfig:
    """The winner's configuration on train + validation, ``length_factor`` times as long, on
    ``threads`` threads (the trial shared the cores with the search's other workers; this run
    has them all)."""
    values = {**trial_config, "train_on": "train+val", "threads": threads,
              "eval_test_each_epoch": False}  # the test split is evaluated once, at the end
    if values.get("schedule", "cyclical") == "cyclical":
        values["cycles"] = int(values.get("cycles", 1)) * length_factor
    else:
        values["epochs"] = int(values.get("epochs", 1)) * length_factor
    return make_train_config(values, "the winner's configuration")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.final", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="study name under studies/, or a YAML path")
    p.add_argument("--dataset", type=str_or_none, default=None,
                   help="the dataset the study ran on, when it was given with --dataset")
    p.add_argument("--smoke", action="store_true", help="the study's smoke run (-smoke)")
    p.add_argument("--length-factor", type=positive, default=LENGTH_FACTOR,
                   help=f"train N times as long as the trial did (default {LENGTH_FACTOR})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imports that cost seconds wait until the arguments are known to be sound.
    from pipeline.search import winner
    from pipeline.search.plan import study_key
    from pipeline.search.processes import usable_cores
    from pipeline.search.studyfile import load_study
    from pipeline.tracking import client as tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        study = load_study(args.study)
        dataset = args.dataset or study.dataset
        key = study_key(study.name, study.dataset, dataset, args.smoke)
        how = " ".join(["python -m pipeline.search --study", args.study,
                        *(["--dataset", dataset] if args.dataset else []),
                        *(["--smoke"] if args.smoke else [])])
        # Read first: a store that does not exist is not created (it holds no winner).
        client = tracking.reading_client(f"Study {key!r} never ran here. Run it first: {how}")
        best = winner.find_winner(client, key, how)
        cfg = final_config(best.config, args.length_factor, usable_cores())
        if cfg.pretrained and not Path(cfg.pretrained).is_file():
            raise ConfigError(f"the winner starts from {cfg.pretrained}, which is gone; run its "
                              f"study again ({how}) to fetch its source's weights")
    except (ConfigError, tracking.TrackingUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from pipeline.training.data import DatasetNotFound, splits_for  # torch: there is a winner

    try:
        splits = splits_for(cfg)
    except DatasetNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    print(f"[{key}] retraining trial {best.trial_number}: {best.why}", flush=True)
    run_id = _start_final_run(client, key, best)
    params = {**cfg.model_dump(), "final.length_factor": args.length_factor,
              "final.study": key, "final.trial_number": best.trial_number,
              "final.trial_run": best.trial_run_id, "final.chosen_by": best.why}
    if os.environ.get("MLFLOW_RUN_ID") == run_id:  # `mlflow run` logged its -P values already
        params = {k: v for k, v in params.items() if k not in client.get_run(run_id).data.params}
    tracking.log_params(client, run_id, params)
    tracking.log_metrics(client, run_id, {"n_train": len(splits.y_train),
                                          "n_test": len(splits.y_test),
                                          "trial_best_val_acc": best.best_val_acc})
    from pipeline.tracking.training_run import train_and_log

    result = train_and_log(client, run_id, cfg, splits)
    if result.diverged:  # no selection can rescue it: there is no validation to fall back on
        print(f"[{key}] final run {run_id}: DIVERGED at epoch {result.history[-1].epoch}; "
              "try a smaller --length-factor")
        return 0
    print(f"[{key}] final run {run_id}: trial {best.trial_number} (val acc "
          f"{best.best_val_acc:.4f}) retrained on train+val ({len(splits.y_train)} examples, "
          f"{cfg.n_epochs} epochs): test acc {result.test_acc:.4f}, measured once")
    return 0


def _start_final_run(client, key: str, best) -> str:
    """A child of the study run that chose the winner, in its experiment; under `mlflow run`,
    the run it made (pointed at the study run the same way)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from pipeline.tracking import client as tracking, context

    experiment_id = (os.environ.get("MLFLOW_EXPERIMENT_ID")
                     or client.get_run(best.study_run_id).info.experiment_id)
    tags = {names.KIND: names.KIND_FINAL, names.STUDY: key,
            names.FINAL_TRIAL_NUMBER: str(best.trial_number),
            names.FINAL_TRIAL_RUN: best.trial_run_id,
            names.DATASET: best.config.get("dataset", ""),
            MLFLOW_PARENT_RUN_ID: best.study_run_id}
    return tracking.start_run(client, experiment_id, f"{key}-final",
                              tags=context.with_context(tags), adopt_env_run=True)


if __name__ == "__main__":
    from pipeline import gc_policy

    gc_policy.pause()  # until training starts (gc_policy.py)
    raise SystemExit(main())
