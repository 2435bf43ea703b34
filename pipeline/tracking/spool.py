"""A tracking store that goes away must not cost a trial's result: retry, then keep it on disk.

``SpoolingClient`` wraps an ``MlflowClient``. Each write (``log_batch``, ``log_artifacts``,
``set_tag``, ``set_terminated``) that fails with a transient error (unreachable, timing out,
busy) is retried with backoff for ``retry_seconds`` (``PIPELINE_TRACKING_RETRY_SECONDS``, default
30). When the store still fails, the write is appended to ``RUN_ID.jsonl`` in the spool folder
(``PIPELINE_SPOOL_DIR``, default ``./.pipeline/spool``; artifacts are copied beside it), and so
is every later write: the store is taken to be down for the rest of the process, so the next
writes are not retried again, and a run's writes keep their order (a status after its metrics).
Training goes on; ``flush()`` then raises ``TrackingLost`` naming the store, the error and
the spool, and the engine stops the study after telling Optuna the trial's result. The trials'
writes go through one in the MLflow writer process (writer.py); run creation and the
study run's writes through one in the worker itself.
``replay()`` (used by ``python -m pipeline.doctor --repair``) writes a spool into the store once
it is back. Errors that retrying cannot fix (a wrong request) are raised at once, as before.

Reads pass through unchanged: they fail as MLflow fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag

from pipeline.tracking import client as tracking, context

RETRY_SECONDS = 30.0
MAX_DELAY = 8.0  # between attempts: 0.5, 1, 2, 4, 8, 8, ... seconds
FINAL_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}
# Two writers inserting the same row at once (e.g. two workers logging the same dataset input for
# the first time): the store refuses the second insert, but the first one has committed, so the
# same request retried finds the row and succeeds. PostgreSQL, SQLite and MySQL spellings.
CONFLICTS = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed",
             "Duplicate entry")


class TrackingLost(RuntimeError):
    """The tracking store stopped answering during a study; what it missed is spooled."""


def spool_dir() -> Path:
    return Path(os.environ.get("PIPELINE_SPOOL_DIR") or Path.cwd() / ".pipeline" / "spool")


def transient(err: Exception) -> bool:
    """Worth retrying: the store is unreachable or busy, not the request wrong."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException) or err.error_code not in FINAL_ERRORS:
        return True
    return any(c in str(err) for c in CONFLICTS)  # a concurrent insert: see CONFLICTS


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: " + " ".join(str(err).split())[:300]


class SpoolingClient:
    """An ``MlflowClient`` whose writes survive an outage of the store (see the module doc)."""

    def __init__(self, client, folder: Path | None = None, retry_seconds: float | None = None):
        self._client = client
        self.tracking_uri = client.tracking_uri
        self._folder = folder
        self._retry = float(os.environ.get("PIPELINE_TRACKING_RETRY_SECONDS", RETRY_SECONDS)
                            if retry_seconds is None else retry_seconds)
        self._down: str | None = None  # the error that made us give up on the store
        self._spooled: list[str] = []  # run ids spooled since the last flush()

    # -- writes ------------------------------------------------------------------------------
    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._write("log_batch", run_id, metrics=list(metrics), params=list(params),
                    tags=list(tags))

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        self._write("log_artifacts", run_id, local_dir=str(local_dir),
                    artifact_path=artifact_path)

    def set_tag(self, run_id, key, value):
        self._write("set_tag", run_id, key=key, value=str(value))

    def log_inputs(self, run_id, datasets=None):
        self._write("log_inputs", run_id, datasets=list(datasets or []))

    def set_terminated(self, run_id, status=None, end_time=None):
        # The time the run really ended, not when a replay gets to it.
        self._write("set_terminated", run_id, status=status,
                    end_time=end_time or int(time.time() * 1000))

    def create_run(self, *args, **kwargs):
        """No run, nothing to keep: retried, then ``TrackingLost`` (no trial has trained)."""
        if self._down:
            raise TrackingLost(self._message("could not create a run"))
        try:
            return self._retrying(lambda: self._client.create_run(*args, **kwargs))
        except Exception as err:
            if not transient(err):
                raise
            self._down = _describe(err)
            raise TrackingLost(self._message("could not create a run")) from None

    def create_run_or_spool(self, pending: str, experiment_id, start_time=None, tags=None,
                            run_name=None) -> str | None:
        """Create a run whose writes may already be queued under ``pending`` (an id handed out
        before the run existed, writer.py). When the store is gone, the creation is
        kept as the first record of ``pending``'s spool, and its writes after it: ``replay``
        makes the run, then writes them. Returns the run id, or None when spooled."""
        if not self._down:
            try:
                return self._retrying(lambda: self._client.create_run(
                    experiment_id, start_time=start_time, tags=tags, run_name=run_name)
                    ).info.run_id
            except Exception as err:
                if not transient(err):
                    raise
                self._down = _describe(err)
        keep(self.folder, "create_run", pending, {"experiment_id": experiment_id,
                                                  "start_time": start_time, "tags": tags,
                                                  "run_name": run_name})
        self._spooled.append(pending)
        return None

    # -- the rest ----------------------------------------------------------------------------
    def __getattr__(self, name):
        return getattr(self._client, name)

    def flush(self) -> None:
        """Raise ``TrackingLost`` when writes were spooled since the last call."""
        if self._spooled:
            runs, self._spooled = self._spooled, []
            raise TrackingLost(self._message(
                f"the writes of run(s) {', '.join(runs)} are kept in {self.folder}"))

    def close(self) -> None:
        self.flush()

    @property
    def folder(self) -> Path:
        return self._folder or spool_dir()

    # -- internals ---------------------------------------------------------------------------
    def _message(self, what: str) -> str:
        return (f"the MLflow tracking store {self.tracking_uri!r} stopped answering "
                f"({self._down}; retried for {self._retry:g} s): {what}. The Optuna study keeps "
                "every finished trial's result. Once the store is back, write the kept results "
                "into it with `python -m pipeline.doctor --study NAME --repair`.")

    def _write(self, method: str, run_id: str, **args) -> None:
        if not self._down and not (self.folder / f"{run_id}.jsonl").exists():
            try:
                self._retrying(lambda: _perform(self._client, method, run_id, args))
                return
            except Exception as err:
                if not transient(err):
                    raise
                self._down = _describe(err)
        keep(self.folder, method, run_id, args)
        if run_id not in self._spooled:
            self._spooled.append(run_id)

    def _retrying(self, call):
        deadline, delay = time.monotonic() + self._retry, 0.5
        while True:
            try:
                with tracking.quick_requests():
                    return call()
            except Exception as err:
                if not transient(err) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, MAX_DELAY)


# -- the spool on disk --------------------------------------------------------------------------


def _perform(client, method: str, run_id: str, args: dict) -> None:
    if method == "log_batch":
        client.log_batch(run_id, metrics=args["metrics"], params=args["params"],
                         tags=args["tags"])
    elif method == "log_artifacts":
        client.log_artifacts(run_id, args["local_dir"], args["artifact_path"])
    elif method == "log_inputs":
        client.log_inputs(run_id, datasets=args["datasets"])
    elif method == "set_tag":
        client.set_tag(run_id, args["key"], args["value"])
    elif method == "set_terminated":
        client.set_terminated(run_id, args["status"], args["end_time"])
    else:
        raise ValueError(f"not a spooled write: {method}")


def keep(folder: Path, method: str, run_id: str, args: dict) -> None:
    """Append one write to ``folder/RUN_ID.jsonl`` (artifacts copied under ``folder/RUN_ID/``)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"method": method, **args}
    if method == "log_batch":
        record["metrics"] = [[m.key, m.value, m.timestamp, m.step] for m in args["metrics"]]
        record["params"] = [[p.key, p.value] for p in args["params"]]
        record["tags"] = [[t.key, t.value] for t in args["tags"]]
    elif method == "log_inputs":
        record["datasets"] = [context.input_to_plain(d) for d in args["datasets"]]
    elif method == "log_artifacts":  # the caller deletes its folder on return: copy it
        copy = Path(run_id, uuid.uuid4().hex[:8])
        shutil.copytree(args["local_dir"], folder / copy)
        record["local_dir"] = str(copy)
    with open(folder / f"{run_id}.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")  # json writes NaN / Infinity, and reads them back


def spooled_runs(folder: Path | None = None) -> list[str]:
    """Run ids with writes waiting in the spool."""
    folder = folder or spool_dir()
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def pending(run_id: str, folder: Path | None = None) -> list[dict]:
    path = (folder or spool_dir()) / f"{run_id}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay(client, run_id: str, folder: Path | None = None) -> tuple[int, str]:
    """Write a run's spooled writes into the store, in order; returns how many, and the run's
    id (new when the run's creation was spooled too: ``run_id`` was then a pending id). On an
    error the writes not yet done stay in the spool (the error is raised)."""
    folder = folder or spool_dir()
    records = pending(run_id, folder)
    path = folder / f"{run_id}.jsonl"
    target = run_id
    for i, rec in enumerate(records):
        try:
            if rec["method"] == "create_run":
                target = client.create_run(rec["experiment_id"], start_time=rec["start_time"],
                                           tags=rec["tags"], run_name=rec["run_name"]
                                           ).info.run_id
            else:
                _perform(client, rec["method"], target, _decode(rec, folder))
        except BaseException:  # the rest stays, under the run's id once it has one
            folder.joinpath(f"{target}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records[i:]))
            if target != run_id:
                path.unlink()
            raise
    path.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder / run_id)
    return len(records), target


def _decode(rec: dict, folder: Path) -> dict:
    args = {k: v for k, v in rec.items() if k != "method"}
    if rec["method"] == "log_batch":
        args["metrics"] = [Metric(k, float(v), ts, step) for k, v, ts, step in rec["metrics"]]
        args["params"] = [Param(k, v) for k, v in rec["params"]]
        args["tags"] = [RunTag(k, v) for k, v in rec["tags"]]
    elif rec["method"] == "log_inputs":
        args["datasets"] = [context.input_from_plain(d) for d in rec["datasets"]]
    elif rec["method"] == "log_artifacts":
        args["local_dir"] = str(folder / rec["local_dir"])
    return args
