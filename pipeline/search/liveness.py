"""Which process holds a trial, and whether it still lives.

Optuna keeps heartbeats for RDB storages only. For a journal file (several processes on one
machine) each worker tags the trials it claims with ``host:pid:start``, the process's start time
making a reused pid harmless, and a RUNNING trial counts as abandoned when its process, on this
host, is gone. A trial claimed on another host counts as alive: that host's own launches, or the
RDB storage's heartbeats, decide for it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

WORKER_ATTR = "worker"  # trial user attribute: the process that claimed it


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def worker_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    return f"{socket.gethostname()}:{pid}:{stat[19] if stat else ''}"  # field 22: start time


def is_alive(worker: str | None) -> bool:
    """False for a trial nobody claimed by name (written before tagging, or by hand)."""
    if not worker:
        return False
    host, pid, start = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(int(pid))
        return stat is not None and stat[0] != "Z" and (not start or stat[19] == start)
    try:  # no /proc (macOS): the pid alone
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandoned(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """RUNNING trials whose worker process is gone."""
    return [t for t in trials if t.state == TrialState.RUNNING
            and not is_alive(t.user_attrs.get(WORKER_ATTR))]
