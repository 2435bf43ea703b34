"""What every command shares: exit codes, the argument parser, whole-number and optional flags.

Every command answers bad input the same way: one readable line on stderr, exit code 2, and
nothing created. MLproject passes numbers as floats ("4.0") and unset parameters as "", so the
argument types accept both.
"""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_FAILED = 1  # trials kept failing, or the tracking store went away
EXIT_BAD_INPUT = 2  # a study file, flag, storage, dataset or store the user must fix
# What a spawned --workers process tells its launcher (never seen by a user):
EXIT_STOPPED_ON_FAILURES = 3
EXIT_TRACKING_LOST = 4


class Parser(argparse.ArgumentParser):
    """Flag errors read like every other bad input: one line, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} -h)\n")


def whole(text: str) -> int:
    """A whole number; accepts "4.0", since MLproject passes numbers as floats."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def positive(text: str) -> int:
    """A whole number >= 1."""
    value = whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


AUTO = "auto"
WORKERS_ENV = "PIPELINE_WORKERS"  # the default of --workers on this machine (default: auto)
WORKERS_HELP = (f"worker processes on this machine, or auto (the default; or {WORKERS_ENV}): one "
                "per usable core, started once the trials left are worth their start-up")


def workers(text: str) -> int | None:
    """``--workers``: a whole number >= 1, or "auto" (None: the usable cores, see
    pipeline.search.processes); "" (an MLproject parameter left unset) is the default."""
    import os

    text = text.strip() or os.environ.get(WORKERS_ENV, AUTO).strip() or AUTO
    return None if text.lower() == AUTO else positive(text)


def whole_or_none(text: str) -> int | None:
    """A whole number, or None for "" (an MLproject parameter left unset)."""
    return whole(text) if text.strip() else None


def str_or_none(text: str) -> str | None:
    """A string, or None for "" (an MLproject parameter left unset)."""
    return text.strip() or None
