"""One training run logged as it goes: epochs in batches, then final metrics, artifacts, status.

Used by ``python -m pipeline.train`` and the final run (``python -m pipeline.final``).
"""

from __future__ import annotations

from pipeline import gc_policy, names
from pipeline.config import TrainConfig
from pipeline.tracking import client as tracking, context
from pipeline.training import artifacts
from pipeline.training.trainer import train


def train_and_log(client, run_id: str, cfg: TrainConfig, splits):
    """Train with the epochs logged as they end (in batches), then log the final metrics and the
    artifacts (figures included) and end the run: FINISHED, FAILED (an error) or KILLED (Ctrl-C)."""
    gc_policy.resume_frozen()  # start-up is over (a process started by an entry point)
    status = "FAILED"
    epochs = tracking.EpochWriter(client, run_id)  # epochs in batches, every few seconds
    try:
        client.log_inputs(run_id, context.dataset_inputs(splits, cfg))
        result = train(cfg, splits, on_epoch=epochs)
        epochs.flush(final=result.final_metrics(), final_step=result.history[-1].step,
                     tags={names.DIVERGED: str(result.diverged).lower()})
        tracking.log_artifacts(client, run_id, artifacts.training_artifacts(result, splits))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        epochs.flush()  # the epochs of a run that stopped early, if any wait
        tracking.end_run(client, run_id, status)
    return result
