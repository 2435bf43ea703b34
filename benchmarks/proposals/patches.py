"""Proposed changes to the search's I/O and start-up, applied by patching one process.

Benchmarks use these to measure a proposal before anyone edits the pipeline (see
benchmarks/README.md); nothing in ``pipeline/`` imports this.

- ``journal_without_fsync``: Optuna's journal appends without ``os.fsync``. Each append is still
  written to the file (the page cache), so other processes see it at once and a killed process
  loses nothing; only a power loss or kernel crash can lose the last appends.
- ``sqlite_wal``: every SQLite connection SQLAlchemy opens (MLflow's store) in WAL mode with
  ``synchronous=NORMAL``: a commit no longer waits for fsync (checkpoints do). WAL is a property
  of the database file, so ``mlflow ui`` and other readers keep working.
- ``lazy_figures``: ``pipeline.figures`` (seaborn, scipy.stats) is executed on first use; a
  search never draws (``with_figures=False``).
"""

from __future__ import annotations

import importlib.util
import json
import sys


def journal_without_fsync() -> None:
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file

    def append_logs(self, logs):  # Optuna 5.0's JournalFileBackend.append_logs minus os.fsync
        with get_lock_file(self._lock):
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()

    JournalFileBackend.append_logs = append_logs


def sqlite_wal() -> None:
    import sqlalchemy

    def pragmas(dbapi_conn, _record):
        if type(dbapi_conn).__module__.startswith("sqlite3"):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", pragmas)


class _LazyFigures:
    """A meta-path finder that loads ``pipeline.figures`` through importlib's LazyLoader."""

    def find_spec(self, name, path=None, target=None):
        if name != "pipeline.figures":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def lazy_figures() -> None:
    if "pipeline.figures" not in sys.modules:
        sys.meta_path.insert(0, _LazyFigures())


ALL = {"journal-fsync-off": journal_without_fsync, "sqlite-wal": sqlite_wal,
       "lazy-figures": lazy_figures}
