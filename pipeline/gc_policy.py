"""Python's cyclic garbage collector in a process that loads torch, MLflow and Optuna.

Importing them, and opening the stores, makes about a million long-lived objects and little
garbage, yet every full collection walks all of them: 100 to 300 ms a pass here, several passes
while a study starts and again among its first trials (measured: about 1.2 s of collection in
a 10 s coarse study). So a process started to run a study pauses the collector at its entry
point (`pause`), and when the worker loop starts (`resume_frozen`) it *freezes* what exists
(`gc.freeze`: never walked again nor freed; it lives as long as the process anyway) and
collects again: the trials' garbage is collected as usual.

Only entry points pause, never an import or a library call, so a process that calls
`pipeline.search.main` (the tests do) keeps its collector as it was.
"""

from __future__ import annotations

import gc

_paused = False  # by this module, in this process


def pause() -> None:
    """At a process's entry point: no collections until `resume_frozen`."""
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
