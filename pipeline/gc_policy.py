"""Python's cyclic garbage collector in a process that loads torch, MLflow and Optuna.

Importing them, and opening the stores, makes about a million long-lived objects and little
garbage, yet every full collection walks all of them: 100 to 300 ms a pass here, several passes
while a command starts (measured: 1.2-1.3 s of collection in a 12 s coarse study). So a command
pauses the collector at its entry point (`pause`). When its start-up is over (`resume_frozen`:
the search's worker loop starts, `pipeline.train` and `pipeline.final` start training, the
report is about to fork its figure workers) it *freezes* what exists (`gc.freeze`: never walked
again nor freed; it lives as long as the process anyway) and collects again, so what comes later
is collected as usual. This is the recipe of the `gc.freeze` documentation, which also keeps
forked workers from copying pages that a collection would touch.

Only entry points (`if __name__ == "__main__"`, a spawned worker's target) pause, never an
import or a library call: a process that calls `pipeline.search.main` (the tests do) keeps its
collector as it was.
"""

from __future__ import annotations

import gc

_paused = False  # by this module, in this process


def pause() -> None:
    """At a command's entry point: no collections until `resume_frozen`."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_frozen() -> None:
    """Start-up is over: freeze what exists, collect again. A no-op unless `pause` paused."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False


def freeze_inherited() -> None:
    """In a forked child that runs its own code from here on (the MLflow writer): what it
    inherited is never walked nor freed (a collection would copy every page it touches, and
    freeing could close what the parent still uses); what comes later is collected as usual."""
    global _paused
    gc.freeze()
    gc.enable()
    _paused = False
