"""Optuna storages by URL, the inter-process lock that keeps trial counts exact, heartbeats.

- default: ``optuna.journal`` in the working directory, a journal file that several processes on
  one machine may share (Optuna advises against one SQLite file shared by several processes);
- ``PATH.journal`` or ``journal:PATH``: a journal file elsewhere;
- ``sqlite:///PATH``, ``postgresql://...``, ``mysql://...``: Optuna's RDB storage, with heartbeats
  so that a trial whose worker died is failed (and retried once) by the next worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

DEFAULT_STORAGE = "optuna.journal"
HEARTBEAT_SECONDS = 10  # PIPELINE_HEARTBEAT_SECONDS: how often a running trial says it lives
GRACE_SECONDS = 30  # PIPELINE_GRACE_SECONDS: a trial silent this long has lost its worker
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


class StorageError(RuntimeError):
    """The storage URL is malformed or the store cannot be reached."""


@dataclass(frozen=True)
class StorageSpec:
    url: str  # what the user gave (or the default), passed on to worker processes
    kind: str  # "journal" | "rdb" | "memory"
    path: str | None = None  # journal or sqlite file


def parse_storage(url: str | None) -> StorageSpec:
    """Resolve ``--storage`` / OPTUNA_STORAGE / the default into a spec (no I/O)."""
    url = url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE
    if url == ":memory:":
        return StorageSpec(url, "memory")
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme in RDB_SCHEMES:
        path = url.split(":///", 1)[1] if scheme == "sqlite" and ":///" in url else None
        return StorageSpec(url, "rdb", path)
    if url.startswith("journal:"):
        return StorageSpec(url, "journal", url.removeprefix("journal:"))
    if url.endswith(".journal") and "://" not in url:
        return StorageSpec(url, "journal", url)
    raise StorageError(
        f"storage {url!r} is not understood. Use a journal file (optuna.journal, "
        "journal:PATH), sqlite:///PATH, or postgresql://USER@HOST:PORT/DB.")


_memory: dict[str, optuna.storages.BaseStorage] = {}


def no_optuna_tables(spec: StorageSpec) -> bool:
    """A reachable database without Optuna's tables, checked without creating them (Optuna's
    RDBStorage creates its schema when opened): a command that only reads checks this first.
    False when the database cannot be reached: open_storage then says why."""
    if spec.path is not None:  # SQLite, opened read-only: not even a journal mode is written
        import sqlite3

        try:
            conn = sqlite3.connect(f"{Path(spec.path).resolve().as_uri()}?mode=ro", uri=True)
            try:
                return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                    "name = 'studies'").fetchone() is None
            finally:
                conn.close()
        except sqlite3.Error:
            return False
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(spec.url)
    except Exception:
        return False
    try:
        with engine.connect() as conn:
            return not sqlalchemy.inspect(conn).has_table("studies")
    except Exception:
        return False
    finally:
        engine.dispose()


def open_storage(spec: StorageSpec) -> optuna.storages.BaseStorage:
    """Open (and check) the storage; raises StorageError with the URL and the fix."""
    try:
        if spec.kind == "memory":
            return _memory.setdefault(spec.url, optuna.storages.InMemoryStorage())
        if spec.path:  # a journal or SQLite file: its folder must be there
            folder = Path(spec.path).resolve().parent
            if not folder.is_dir():
                raise StorageError(f"folder {folder} does not exist; create it, or give "
                                   "another path")
        if spec.kind == "journal":
            return JournalStorage(JournalFile(spec.path))
        # Under a lock: workers starting together on an empty database would race to create
        # Optuna's tables (PostgreSQL: "duplicate key value ... pg_type_typname_nsp_index").
        with warnings.catch_warnings(), study_lock(spec, "\0optuna-schema"):
            # heartbeats are marked experimental; we chose them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                spec.url, heartbeat_interval=_seconds("PIPELINE_HEARTBEAT_SECONDS",
                                                      HEARTBEAT_SECONDS),
                grace_period=_seconds("PIPELINE_GRACE_SECONDS", GRACE_SECONDS),
                heartbeat_stale_trial_callback=retry_stale,
                engine_kwargs={"pool_pre_ping": True} if spec.path is None else None,
            )
        storage.get_all_studies()  # fail now, not in the middle of a trial
        return storage
    except StorageError as err:
        raise StorageError(f"cannot open Optuna storage {spec.url!r}: {err}") from None
    except Exception as err:
        first = " ".join(str(err).split())[:300]
        raise StorageError(
            f"cannot open Optuna storage {spec.url!r}: {type(err).__name__}: {first}\n"
            "Check the URL, that the database server is running and reachable, and the "
            "driver (postgresql needs psycopg)."
        ) from None


def _seconds(name: str, default: int) -> int:
    """Optuna takes whole seconds (tests shorten the heartbeat to 1 s)."""
    text = os.environ.get(name)
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise StorageError(f"{name}={text!r}: expected a whole number of seconds, at least 1")
    return int(text)


def retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Requeue a trial whose worker died, once, with the same parameters: Optuna's
    RetryHeartbeatStaleTrialCallback(max_retry=1), called by RDB storages for heartbeat-stale
    trials and by pipeline.search.stale for journal trials whose process is gone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


class JournalFile(JournalFileBackend):
    """Optuna's journal file, appended under an ``flock`` and without an ``os.fsync``.

    Optuna's backend takes, per append (15 to 30 per trial: every ``suggest_*``, every pruner
    ``report``, every user attribute): a symlink lock (``symlink``, ``rename``, ``unlink``: three
    file-system metadata writes), then ``open``, ``write``, ``fsync`` and ``close``. Here an
    append is one ``write`` to a descriptor kept open in ``O_APPEND`` mode, under an ``flock``
    on it (a lock the kernel holds in memory): 0.04 ms instead of 0.13 ms an append in the coarse
    study (its 485 appends: 19 ms instead of 64 ms), and no wait for the disk (the fsync cost 6
    to 11 ms a trial on a quiet machine, over 100 ms when other processes write). See
    benchmarks/README.md.

    - Several processes: every writer in this project appends through this class, so the flock
      serialises them, also on NFSv4 (where Linux maps ``flock`` to a byte-range lock). A writer
      using Optuna's own backend (say, optuna-dashboard) takes the symlink lock instead; on a
      local file system its appends and ours still never interleave, since each is one
      ``O_APPEND`` write of whole lines. Several machines should share PostgreSQL instead.
    - Crashes: an append reaches the kernel before the lock is released, so other processes
      read it at once and a killed process loses nothing it wrote; only a power cut can lose
      the last appends, and Optuna's reader ignores a torn last line.
    - Reading and the line format stay Optuna's own (tests/test_storage.py reads each
      implementation's file with the other).
    """

    def __init__(self, file_path: str, lock_obj=None) -> None:
        super().__init__(file_path, lock_obj)
        self._fd: int | None = None
        self._fd_pid = 0  # a forked child opens its own: an flock is per open file

    def append_logs(self, logs: list[dict]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        data = memoryview(data.encode("utf-8"))
        fd = self._append_fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            while data:  # one write; a short one (a signal, a full disk) goes on where it stopped
                data = data[os.write(fd, data):]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def read_logs(self, log_number_from: int):
        """Optuna's reader, which opens the file on every call (Optuna reads before every
        storage call: 35 times a coarse trial); a ``stat`` first tells whether anything was
        appended since the last read."""
        known_end = getattr(self, "_log_number_offset", {}).get(log_number_from)
        if known_end is not None and os.stat(self._file_path).st_size == known_end:
            return
        yield from super().read_logs(log_number_from)

    def _append_fd(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                               | os.O_CLOEXEC, 0o644)
            self._fd_pid = os.getpid()
        return self._fd

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_fd_pid": 0}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


_thread_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def study_lock(spec: StorageSpec, study_name: str):
    """Serialise "count trials, then take one" across processes so totals stay exact.

    Files get an flock on their folder (so no lock file is left behind, and opening a storage
    to read creates nothing); PostgreSQL an advisory lock; memory a thread lock. Not nested:
    a second lock on the same storage from the same process would wait for the first.
    """
    if spec.kind == "memory":
        with _thread_locks.setdefault(study_name, threading.Lock()):
            yield
        return
    if spec.kind == "rdb" and spec.path is None:
        yield from _advisory_lock(spec.url, study_name)
        return
    fd = os.open(Path(spec.path).resolve().parent, os.O_RDONLY)  # claims are brief
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _advisory_lock(url: str, study_name: str):
    import sqlalchemy

    key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
    engine = _engines.get(url) or _engines.setdefault(url, sqlalchemy.create_engine(url))
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        elif engine.dialect.name == "mysql":
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": str(key)})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": str(key)})
        else:
            yield


_engines: dict = {}


class Heartbeat:
    """Records a trial's heartbeat every interval while it runs (RDB storages only)."""

    def __init__(self, storage, trial_id: int):
        self._storage, self._trial_id = storage, trial_id
        interval = storage.get_heartbeat_interval() if isinstance(storage, RDBStorage) else None
        self._interval = interval
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self._interval:
            self._storage.record_heartbeat(self._trial_id)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a missed beat is not worth a crash
                self._storage.record_heartbeat(self._trial_id)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
