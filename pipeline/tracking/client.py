"""Every MLflow write, through an explicit ``MlflowClient`` and run ids.

No global active-run stack: under ``mlflow run`` (which sets MLFLOW_RUN_ID) ``fluent`` nesting
returns the parent run itself (MLflow #15713), so child runs are created with ``create_run`` and a
``mlflow.parentRunId`` tag, and logged to by id.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline import names

if TYPE_CHECKING:  # the annotation only: the report reads MLflow without importing torch
    from pipeline.training.trainer import EpochRecord

BATCH = 1000  # MLflow's log_batch limit for metrics
PARAM_BATCH = 100
FLUSH_SECONDS = 2.0  # epoch metrics reach MLflow at least this often while a run trains


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or used; the message names the URI and the fix."""


class StoreMissing(TrackingUnavailable):
    """The tracking store does not exist yet, so it holds no run: a command that only reads
    stops here rather than create it."""


_INHERITED_POOLS: list = []  # a forked process's copies of its parent's pools, never freed


def forget_inherited_connections() -> None:
    """In a process just forked from one that had opened MLflow SQL stores: give each store's
    engine a fresh connection pool, leaving the parent's connections to the parent (SQLAlchemy's
    recipe for a fork: ``Engine.dispose(close=False)``). The old pools are kept: one that was
    freed would close its connections, and closing an inherited connection acts on the parent's
    (SQLite may check-point and delete the parent's write-ahead log; PostgreSQL ends its
    session)."""
    import sys

    store = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    if store is not None:
        for engine in list(store.SqlAlchemyStore._engine_map.values()):
            _INHERITED_POOLS.append(engine.pool)
            engine.dispose(close=False)


def tracking_client() -> MlflowClient:
    """A client on the standard URI resolution (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db),
    for writing: a SQLite store is created when missing, and put in WAL mode."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:"):
        return MlflowClient()
    _sqlite_wal(switch=True)  # before the client opens its first connection
    # Making a client makes a new store's tables: launchers started together on one machine
    # raced there ("table ... already exists"). The first makes them, the others wait. The
    # lock is on the store's folder, so no lock file is left behind.
    folder = Path(uri.split(":///", 1)[1]).resolve().parent if ":///" in uri else None
    if folder is None or not folder.is_dir():
        return MlflowClient()
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return MlflowClient()
    finally:
        os.close(fd)  # releases the lock


_WAL = {"switch": False}  # True once a writing client was made in this process


def _set_wal(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    if _WAL["switch"]:  # a store's journal mode is written in its file: never by a reader
        cursor.execute("PRAGMA journal_mode=WAL")
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        cursor.execute("PRAGMA synchronous=NORMAL")  # this connection only
    cursor.close()


def _sqlite_wal(switch: bool) -> None:
    """SQLite in write-ahead-log mode with synchronous=NORMAL: each MLflow write stops waiting
    for a disk sync (a committed transaction survives a killed process; only a power cut can
    lose the last ones), and readers such as `mlflow ui` no longer block writers. Registered
    when a client is made, never at import; ``switch``: a writing client, which may switch a
    store to WAL mode (a reading one only uses WAL mode where the store is in it)."""
    import sqlalchemy
    from sqlalchemy.engine import Engine

    _WAL["switch"] = _WAL["switch"] or switch
    if not sqlalchemy.event.contains(Engine, "connect", _set_wal_if_sqlite):
        sqlalchemy.event.listen(Engine, "connect", _set_wal_if_sqlite)


def _set_wal_if_sqlite(dbapi_connection, record) -> None:
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        _set_wal(dbapi_connection, record)


@contextlib.contextmanager
def quick_requests():
    """One quick HTTP attempt per call: MLflow's default policy (7 retries, exponential backoff,
    120 s timeout) takes minutes to give up on a server that is gone; callers that retry do it
    themselves (check_store does not, spool.SpoolingClient retries with its own bound). A
    user's own settings win."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    unset = [k for k in quick if k not in os.environ]
    os.environ.update({k: quick[k] for k in unset})
    try:
        yield
    finally:
        for k in unset:
            os.environ.pop(k, None)


def check_store(client: MlflowClient) -> None:
    """Fail early, before anything is trained, when the tracking store is unusable."""
    try:
        with quick_requests():
            client.search_experiments(max_results=1)
    except Exception as err:
        raise TrackingUnavailable(
            f"cannot use the MLflow tracking store {client.tracking_uri!r}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            "Check MLFLOW_TRACKING_URI (unset it to use ./mlflow.db), or start the server."
        ) from None


def check_uri() -> bool:
    """check_store before anything exists: a SQLite store whose file is not there yet (or holds
    no MLflow tables yet) is not created here, only its folder is checked, so that a later
    bad-input error leaves nothing behind; an existing store is probed without being changed
    (reading_client); any other store is probed. False: the store does not exist yet (and so
    holds no run)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    path = _sqlite_path(uri)
    if path is not None and not path.resolve().parent.is_dir():
        raise TrackingUnavailable(
            f"cannot use the MLflow tracking store {uri!r}: folder {path.resolve().parent} does "
            "not exist. Create it, or unset MLFLOW_TRACKING_URI to use ./mlflow.db.")
    if _missing(uri):
        return False
    reading_client()
    return True


def reading_client(hint: str = "") -> MlflowClient:
    """A client for a command that only reads (the report, the doctor, the final run's checks;
    the search's checks, through check_uri): the store must exist already, and nothing is made
    or changed to open it (no file, no tables, not even a SQLite store's journal mode). Raises
    StoreMissing, whose message ends with ``hint`` (what to run first), or TrackingUnavailable.
    Its writes (the report's artifacts, a final run) go to the store as it is."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    why = _missing(uri)
    if why:
        raise StoreMissing(f"the MLflow tracking store {uri!r} does not exist ({why}): nothing "
                           "has been logged there yet. " + (hint or "Run the study first, or "
                           "set MLFLOW_TRACKING_URI to the store it ran with."))
    if _sqlite_path(uri) is not None:
        _sqlite_wal(switch=False)
    client = MlflowClient(uri)
    check_store(client)
    return client


def _sqlite_path(uri: str) -> Path | None:
    """The file of a SQLite store (sqlite:///PATH), or None (another store, or in memory)."""
    if not uri.startswith("sqlite:") or ":///" not in uri:
        return None
    path = uri.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" and not path.startswith("file:") else None


def _missing(uri: str) -> str | None:
    """Why the store does not exist yet, read without creating or changing anything; None
    when it exists (a server or database is taken to exist: its client is probed). A SQLite
    file that is empty or holds no MLflow tables holds no run either."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file" or not parsed.scheme and uri != "databricks":  # a folder store
        folder = Path(parsed.path if parsed.scheme else uri)
        return None if folder.exists() else f"{folder} is missing"
    path = _sqlite_path(uri)
    if path is None:
        return None
    if not path.exists():
        return f"{path} is missing"
    if not path.is_file():
        raise TrackingUnavailable(f"cannot use the MLflow tracking store {uri!r}: {path} is "
                                  "not a file")
    if path.stat().st_size == 0:
        return f"{path} is empty"
    import sqlite3

    try:  # mode=rw: SQLite must not create the file, even if it went away meanwhile
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)
        try:
            tables = {row[0] for row in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as err:
        raise TrackingUnavailable(f"cannot use the MLflow tracking store {uri!r}: {path}: "
                                  f"{err}. Is it an MLflow store?") from None
    return None if {"experiments", "runs"} <= tables else f"{path} holds no MLflow tables"


def start_run(client: MlflowClient, experiment_id: str, name: str, parent_id: str | None = None,
              tags: Mapping[str, str] | None = None, adopt_env_run: bool = False) -> str:
    """Create a run and return its id. With ``adopt_env_run`` and MLFLOW_RUN_ID set (we were
    started by `mlflow run`), that run becomes ours instead: it already exists and is RUNNING."""
    tags = dict(tags or {})
    env_run = os.environ.get("MLFLOW_RUN_ID") if adopt_env_run else None
    if env_run:
        client.set_tag(env_run, MLFLOW_RUN_NAME, name)
        set_tags(client, env_run, tags)
        return env_run
    if parent_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_id
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def start_run_later(client, experiment_id: str, name: str, parent_id: str,
                    tags: Mapping[str, str]) -> str:
    """A child run made by a ``QueuedClient``'s writer process, off the caller's path; returns
    its pending id (``client.run_id(pending)`` gives the real one once it exists)."""
    return client.create_run_later(experiment_id, name, {**tags, MLFLOW_PARENT_RUN_ID: parent_id})


def find_trial_run(client: MlflowClient, study_key: str, number: int) -> str | None:
    """The RUNNING run of a study's trial, by its tags: for a trial whose worker died before
    recording its run id on the trial."""
    for run in study_runs(client, study_key, names.where((names.TRIAL_NUMBER, number))
                          + " and attributes.status = 'RUNNING'"):
        if run.data.tags.get(names.KIND) == names.KIND_TRIAL:
            return run.info.run_id
    return None


def study_runs(client: MlflowClient, key: str, where: str = "") -> list:
    """Every active run tagged with the study (study runs and trial runs), all pages."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = names.where((names.STUDY, key)) + (f" and {where}" if where else "")
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, object]) -> None:
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, object]) -> None:
    items = [Param(k, "None" if v is None else str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAM_BATCH):
        client.log_batch(run_id, params=items[i:i + PARAM_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float],
                step: int = 0) -> None:
    """One batched write; non-finite values are logged as they are (MLflow stores NaN/inf)."""
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), BATCH):
        client.log_batch(run_id, metrics=items[i:i + BATCH])


class EpochWriter:
    """Per-epoch callback that writes a run's epoch metrics (at step = optimiser updates so far)
    in batches: an epoch is buffered and the buffer written once ``every`` seconds have passed
    since the last write, and by ``flush``. Each write is a database transaction that costs
    milliseconds of CPU, taken from training when training holds every core (a write per epoch
    cost 3 % of a 2.5-s Fashion-MNIST run, benchmarks/train_speed.py); live curves in
    ``mlflow ui`` still move every few seconds. ``params`` go with the first write."""

    def __init__(self, client: MlflowClient, run_id: str, every: float = FLUSH_SECONDS,
                 params: Mapping[str, object] | None = None):
        self.client, self.run_id, self.every = client, run_id, every
        self.params: Mapping[str, object] | None = params
        self.buffer: list[EpochRecord] = []
        self.last_write = time.perf_counter()

    def __call__(self, record: EpochRecord) -> None:
        self.buffer.append(record)
        if time.perf_counter() - self.last_write > self.every:
            self.flush()

    def flush(self, final: Mapping[str, float] | None = None, final_step: int = 0,
              tags: Mapping[str, object] | None = None) -> None:
        """Write what is buffered, and the final metrics and tags, in one batch (if any)."""
        if self.buffer or final or tags or self.params:
            log_epochs(self.client, self.run_id, self.buffer, final=final,
                       final_step=final_step, params=self.params, tags=tags)
        self.buffer, self.params = [], None
        self.last_write = time.perf_counter()


def log_epochs(client: MlflowClient, run_id: str, records: Iterable[EpochRecord],
               final: Mapping[str, float] | None = None, final_step: int = 0,
               params: Mapping[str, object] | None = None,
               tags: Mapping[str, object] | None = None) -> None:
    """Several epochs' metrics, and optionally final metrics, params and tags, in as few calls
    as MLflow allows (one, for a short run: each call is a database transaction)."""
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, r.step)
             for r in records for k, v in {**r.metrics, "epoch": r.epoch}.items()]
    items += [Metric(k, float(v), ts, final_step) for k, v in (final or {}).items()]
    p = [Param(k, "None" if v is None else str(v)) for k, v in sorted((params or {}).items())]
    t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    first = True
    while first or items or p:
        client.log_batch(run_id, metrics=items[:BATCH], params=p[:PARAM_BATCH],
                         tags=t if first else [])
        items, p, first = items[BATCH:], p[PARAM_BATCH:], False


def log_artifacts(client: MlflowClient, run_id: str, files: Mapping[str, bytes | str],
                  artifact_path: str | None = None) -> None:
    """Write ``{relative path: content}`` to a temporary folder and upload it in one call."""
    if not files:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for rel, content in files.items():
            path = Path(tmp, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        client.log_artifacts(run_id, tmp, artifact_path)


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    client.set_terminated(run_id, status)


def history_dicts(records: Iterable[EpochRecord]) -> list[dict]:
    return [{"epoch": r.epoch, "step": r.step, **r.metrics} for r in records]
