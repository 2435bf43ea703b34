"""A finished study's winner, read back from MLflow: its best trial's run and configuration.

The best trial is the one the study chose on validation: the ``best_trial`` metric of its latest
finished study run, written with the summary. Only runs the pipeline wrote are used: a study run
found by its ``pipeline.kind`` / ``pipeline.study`` tags, and a trial run that
``study_run.is_trial_run`` recognises as that trial's. Used by the final run (pipeline.final)
and by transfer studies (pipeline.search.transfer).
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.config import ConfigError
from pipeline.search.study_run import is_trial_run


class NoWinner(ConfigError):
    """The study has no finished execution with a best trial in the tracking store."""


@dataclass(frozen=True)
class Winner:
    """The best trial of a study, as its runs recorded it."""

    study_key: str
    study_run_id: str
    trial_run_id: str
    trial_number: int
    best_val_acc: float
    config: dict  # the trial's resolved TrainConfig (config.json)
    why: str = ""  # how it was chosen, in words

    @property
    def rechecked(self) -> bool:
        return self.why.startswith("re-check")


def find_winner(client: MlflowClient, key: str, how_to_run: str) -> Winner:
    """The best trial of the study's latest execution that finished with one.

    ``how_to_run``: the command that runs the study, for the error message.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(  # a study's executions: a handful, newest first
        experiments, order_by=["attributes.start_time DESC"], max_results=1000,
        filter_string=names.where((names.STUDY, key), (names.KIND, names.KIND_STUDY))
        + " and attributes.status = 'FINISHED'")
    for study_run in runs:
        metrics, tags = study_run.data.metrics, study_run.data.tags
        if names.BEST_TRIAL not in metrics:
            continue  # an execution that ended with no completed trial
        number = int(metrics[names.BEST_TRIAL])
        why = f"the best single trial by validation ({metrics.get(names.BEST_VAL_ACC, 0):.4f})"
        if names.WINNER_TRIAL in tags:  # re-checked over fresh seeds: the best mean wins
            number = int(tags[names.WINNER_TRIAL])
            why = (f"re-checked winner: best mean validation "
                   f"{metrics.get(names.WINNER_VAL_MEAN, float('nan')):.4f} over "
                   f"{int(metrics.get(names.N_RECHECK_RUNS, 0))} re-check runs of "
                   "the best trials")
        trial_run_id = tags.get(names.BEST_TRIAL_RUN) or next(
            (r.info.run_id for r in client.search_runs(
                experiments, order_by=["attributes.start_time DESC"], max_results=1,
                filter_string=names.where((names.STUDY, key), (names.KIND, names.KIND_TRIAL),
                                          (names.TRIAL_NUMBER, number))
                + " and attributes.status = 'FINISHED'")), None)
        if trial_run_id is None or not is_trial_run(client, trial_run_id, key, number):
            continue  # never load files from a run the pipeline did not write for this study
        trial = client.get_run(trial_run_id)
        return Winner(key, study_run.info.run_id, trial_run_id, number,
                      float(trial.data.metrics.get(names.BEST_VAL_ACC, float("nan"))),
                      json.loads(_download(client, trial_run_id, names.CONFIG)), why)
    raise NoWinner(f"study {key!r} has no finished run with a completed trial in the tracking "
                   f"store {client.tracking_uri}. Run it first: {how_to_run}")


def _download(client: MlflowClient, run_id: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def input_shape(client: MlflowClient, winner: Winner) -> tuple[int, ...]:
    """(C, H, W) of the images the winner was trained on, from its logged example images."""
    with np.load(io.BytesIO(_download(client, winner.trial_run_id, names.EXAMPLES)),
                 allow_pickle=False) as npz:
        return tuple(npz["right_images"].shape[1:])


def cached_weights(client: MlflowClient, winner: Winner, folder: Path) -> Path:
    """The winner's weights as a local file ``folder/<run id>.pt`` (downloaded once: a run's
    artifacts never change). Loaded later with torch.load(weights_only=True)."""
    target = Path(folder) / f"{winner.trial_run_id}.pt"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same file system:
            path = client.download_artifacts(winner.trial_run_id, names.WEIGHTS, tmp)
            Path(path).replace(target)  # an atomic rename, never a truncated checkpoint
    return target
