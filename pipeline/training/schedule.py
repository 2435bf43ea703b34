"""Learning-rate schedules in closed form, without torch (reports draw them without training)."""

from __future__ import annotations

from pipeline.config import TrainConfig


def lr_schedule_values(cfg: TrainConfig, steps_per_epoch: int) -> tuple[list[int], list[float]]:
    """The learning rate used at every update of a run, in closed form (for reports).

    Triangular schedule of Smith (2017) with half-cycle n_s: rising from eta_min to eta_max over
    n_s updates, falling back over the next n_s. Tests check it against torch's CyclicLR.
    """
    total = cfg.n_epochs * steps_per_epoch
    steps = list(range(total))
    if cfg.schedule == "constant":
        return steps, [cfg.lr] * total
    n_s = cfg.step_size_epochs * steps_per_epoch
    lrs = [cfg.eta_min + (cfg.eta_max - cfg.eta_min) * (1 - abs(t / n_s - 2 * (t // (2 * n_s)) - 1))
           for t in steps]
    return steps, lrs
