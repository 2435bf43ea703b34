"""Transfer studies: trials that start from another study's best model.

A study with ``source: transfer_source`` compares, per trial, ``transfer``:

- ``scratch``: the source's architecture, fresh weights;
- ``linear_probe``: the source's weights, every layer frozen but a new final layer;
- ``fine_tune``: the source's weights, every layer trained, a new final layer.

Every trial takes the source winner's architecture and input size, so the three differ only in
where the weights start and what trains. Different image sizes are handled on the data side:
target images are resized (bilinear) to the source's size, so a 28x28 Fashion-MNIST CNN reads 8x8
digits as 28x28 images and the checkpoint fits layer for layer, the hidden fully-connected layers
included. The checkpoint is the weights file the source's best trial logged, found through MLflow
(pipeline.search.winner) and loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURE = ("arch", "depth", "width", "activation", "init", "batch_norm", "dropout",
                "conv_blocks", "channels")
INHERITED = (*ARCHITECTURE, "resize")  # settings a transfer trial takes from its source


@dataclass(frozen=True)
class Source:
    """A transfer study's source, resolved: its winner and the settings trials inherit."""

    study_key: str
    trial_run_id: str
    checkpoint: str  # local copy of the winner's weights
    settings: dict  # INHERITED settings


def inherited(source_config: dict, source_input_shape: tuple[int, ...]) -> dict:
    """What every trial takes from the source's best configuration: its architecture, and its
    input size as ``resize`` (the size its images had, resized or native)."""
    settings = {k: source_config[k] for k in ARCHITECTURE if k in source_config}
    height, width = source_input_shape[-2:]
    if height != width:
        raise ValueError(f"source images are {height}x{width}; resize needs square images")
    settings["resize"] = int(height)
    return settings


def trial_settings(source: Source | None, transfer: str | None) -> dict:
    """Settings a trial of a transfer study adds to its own: the inherited ones, and the
    checkpoint unless it trains from scratch."""
    if source is None:
        return {}
    out = dict(source.settings)
    if transfer in ("linear_probe", "fine_tune"):
        out["pretrained"] = source.checkpoint
    return out


def resolve_source(client, key: str, how_to_run: str, folder) -> Source:
    """Find the source study's winner in MLflow and cache its weights in ``folder``."""
    from pipeline.search import winner as winner_mod

    w = winner_mod.find_winner(client, key, how_to_run)
    settings = inherited(w.config, winner_mod.input_shape(client, w))
    path = winner_mod.cached_weights(client, w, folder)
    return Source(key, w.trial_run_id, str(path), settings)
