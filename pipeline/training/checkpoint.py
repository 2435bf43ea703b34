"""Loading weights: data, never code.

Every checkpoint the pipeline reads (a ``pretrained`` file, a trial's ``model/state_dict.pt``)
goes through :func:`load_state_dict`: ``torch.load(weights_only=True)`` refuses a pickle that
would import or call anything beyond tensors and plain containers, and what it returns must be a
mapping of names to tensors. A refused file raises :class:`UnsafeCheckpoint` and nothing in it
has run. (torch >= 2.10: earlier weights-only unpicklers could be escaped, CVE-2025-32434 and
CVE-2026-24747; see pyproject.toml.)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class UnsafeCheckpoint(ValueError):
    """A checkpoint that is not a plain state dict of tensors; it was not executed."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = " ".join(str(err).split())[:200]
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it holds more than tensors (weights-only loading "
            f"rejected it: {first}). Only state dicts are loaded; save one with "
            "torch.save(model.state_dict(), PATH).") from None
    if not (isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise UnsafeCheckpoint(f"refusing to load {path}: not a state dict (a mapping of "
                               f"parameter names to tensors) but {type(state).__name__}")
    return state
