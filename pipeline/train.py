"""Single training run logged as one MLflow run (``python -m pipeline.train``).

    python -m pipeline.train --dataset digits --depth 1 --width 64 --l2-lambda 1e-3 \\
        --eta-min 1e-5 --eta-max 1e-1 --cycles 2
    python -m pipeline.train --schedule constant --lr 0.05 --epochs 20 --optimizer momentum

Flags mirror TrainConfig's field names (underscores become dashes). Exit codes: 0 done (a
diverged run is reported as such, with a zero exit), 2 bad input or unusable store.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Sequence

from pipeline import names
from pipeline.cli import EXIT_BAD_INPUT, whole
from pipeline.config import ConfigError, TrainConfig, make_train_config


def _field_type(annotation):
    """(argparse type, choices) for a TrainConfig annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _field_type(args[0])
    return (whole if annotation is int else annotation), None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags keep the config's defaults."""
    group = parser.add_argument_group("training settings (TrainConfig)")
    for name, info in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        typ, choices = _field_type(info.annotation)
        doc = (info.description or "").split("\n")[0]
        if typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{doc} (default: {info.default})")
        else:
            group.add_argument(flag, type=typ, choices=choices, default=None,
                               metavar=None if choices else name.upper(),
                               help=f"{doc} (default: {info.default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    return make_train_config(given, "command-line flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train", description="Train one model and log it to MLflow.")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name (default: MLFLOW_EXPERIMENT_NAME or Default)")
    parser.add_argument("--run-name", default=None, help="MLflow run name")
    add_config_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imports that cost seconds wait until the arguments are known to be sound.
    from pipeline.tracking import client as tracking, context
    from pipeline.tracking.training_run import train_and_log
    from pipeline.tracking.writer import QueuedClient
    from pipeline.training.data import DatasetNotFound, splits_for

    try:
        cfg = config_from_args(args)
        splits = splits_for(cfg)
        client = tracking.tracking_client()
        tracking.check_store(client)
    except (ConfigError, DatasetNotFound, tracking.TrackingUnavailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    experiment_id = context.resolve_experiment(client, args.experiment, cfg.dataset)
    name = args.run_name or f"{cfg.dataset}-{cfg.arch}-d{cfg.depth}w{cfg.width}-s{cfg.seed}"
    run_id = tracking.start_run(client, experiment_id, name, adopt_env_run=True,
                                tags=context.with_context({names.KIND: names.KIND_TRAIN,
                                                           names.DATASET: cfg.dataset}))
    params = cfg.model_dump()
    if os.environ.get("MLFLOW_RUN_ID") == run_id:
        # `mlflow run` logged its -P values as typed ("1e-4"); MLflow refuses to change a logged
        # param, so those keep their spelling (same value) and only the others are added.
        params = {k: v for k, v in params.items() if k not in client.get_run(run_id).data.params}
    tracking.log_params(client, run_id, params)
    queued = QueuedClient(client)  # epochs are logged by a child process while training goes on
    try:
        result = train_and_log(queued, run_id, cfg, splits)
    finally:
        queued.close()
    if result.diverged:
        print(f"run {run_id}: DIVERGED at epoch {result.history[-1].epoch} (non-finite loss); "
              "lower the learning rate.")
    else:
        print(f"run {run_id}: best val acc {result.best_val_acc:.4f} (epoch {result.best_epoch}), "
              f"test acc {result.test_acc:.4f}, {result.n_params:,} parameters, "
              f"{result.train_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    from pipeline import gc_policy

    gc_policy.pause()  # until training starts (gc_policy.py)
    raise SystemExit(main())
