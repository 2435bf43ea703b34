"""Ctrl-C and SIGTERM stop a study cleanly: the running trial ends as failed, its run KILLED.

Python turns SIGINT into ``KeyboardInterrupt``, but SIGTERM (what `kill`, systemd, Slurm and
container runtimes send) kills the process at once by default, leaving the trial RUNNING and its
run open. While ``stop_on_signals()`` is active, SIGTERM raises ``Terminated`` instead; both are
``BaseException``s, so the ``except Exception`` that records a failing trial does not swallow
them, and the code that unwinds (objective.run_trial, worker.run_worker) marks the trial and run.

The first signal restores the previous handlers: a second Ctrl-C or SIGTERM during the clean-up
forces the exit, as users expect. Exit codes follow the shell's 128 + signal number: 130 for
Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(BaseException):
    """SIGTERM arrived (or another handled signal other than SIGINT)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def exit_code(err: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process killed by it."""
    return 128 + (err.signum if isinstance(err, Terminated) else signal.SIGINT)


def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """While inside: each of ``signals`` raises (KeyboardInterrupt for SIGINT, Terminated for
    the others) in the main thread, once. Outside the main thread (handlers cannot be set
    there) this does nothing."""
    # A signal ignored on purpose (nohup, `cmd &` in a script) stays ignored.
    previous = {s: h for s in signals if (h := signal.getsignal(s)) is not signal.SIG_IGN}

    def handler(signum, _frame):
        for s, h in previous.items():  # a second signal now forces the exit
            signal.signal(s, h)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    return _handling(previous, handler)


def first_call(callback, signals=(signal.SIGINT, signal.SIGTERM)):
    """While inside: each of ``signals`` first calls ``callback()`` (say, to pass the signal on
    to helper processes at once, before this process unwinds), then whatever handled it
    before (``stop_on_signals``' handler, Python's, or the default action). Outside the main
    thread this does nothing."""
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        callback()
        before = previous[signum]
        if callable(before):
            return before(signum, frame)
        if before == signal.SIG_DFL:  # the default action: die by the signal (or Ctrl-C)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        return None

    return _handling(previous, handler)


@contextlib.contextmanager
def _handling(previous: dict, handler):
    """``handler`` for each signal of ``previous`` while inside, then ``previous`` again; in
    the main thread only (elsewhere Python cannot set handlers, and nothing is done)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
