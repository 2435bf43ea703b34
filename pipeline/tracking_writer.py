"""MLflow writes in a child process, so that training never waits for the tracking store.

A trial's MLflow writes (its epoch metrics, artifacts and final status: one `log_batch`, one
`log_artifacts`, one `set_terminated`) cost 25 to 45 ms of CPU on SQLite, as much as 10 % of a
digits trial. MLflow's own asynchronous logging runs them in a thread of the training process,
which competes with training for the GIL (measured slower here than writing synchronously).
`QueuedClient` hands the writes, in order, to a child process (`python -m
pipeline.tracking_writer`, which imports only MLflow) and returns at once; on a machine whose
cores are not all training, the writes cost the trainer nothing.

- Run creation and every read go to an in-process client: creating a run returns its id, which
  the trial records at once. A read first waits for the queue to drain (reads see the writes).
- `flush()` waits until every queued write is done and raises `TrackingUnavailable` naming the
  call that failed; a failed write is retried first (a restarting server; `pipeline.spool`),
  then kept in the spool (spool.py) for `python -m pipeline.doctor --repair` to replay.
- The child ignores Ctrl-C and stops only when its input ends, after the last write: a worker
  that is interrupted or killed loses none of the writes it had queued.

Usage: `client = QueuedClient(tracking.tracking_client())`, then pass it wherever an
`MlflowClient` goes (`pipeline.tracking` calls only `create_run`, `log_batch`, `log_artifacts`,
`set_tag` and `set_terminated`); `client.close()` at the end.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.tracking import TrackingUnavailable

WRITES = ("log_batch", "log_artifacts", "set_tag", "set_terminated")
_HEADER = struct.Struct("!I")


class QueuedClient:
    """An `MlflowClient` whose writes run in order in a child process (see the module doc)."""

    def __init__(self, client):
        self._client = client  # in-process: run creation and reads
        self.tracking_uri = client.tracking_uri
        ack_read, ack_write = os.pipe()  # not stdout: MLflow may print there
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.tracking_writer", client.tracking_uri,
             str(ack_write)], stdin=subprocess.PIPE, pass_fds=(ack_write,))
        os.close(ack_write)
        self._acks = os.fdopen(ack_read, "rb")
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sent = self._done = 0
        self._errors: list[str] = []
        self._cond = threading.Condition()
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._feeder.start()
        self._reader.start()

    # -- writes: queued ---------------------------------------------------------------------
    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._put("log_batch", run_id, list(metrics), list(params), list(tags))

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        # The caller may delete local_dir on return: the files travel with the message.
        root = Path(local_dir)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self._put("log_artifacts", run_id, files, artifact_path)

    def set_tag(self, run_id, key, value):
        self._put("set_tag", run_id, key, value)

    def set_terminated(self, run_id, status=None, end_time=None):
        # the time the run really ended, not when the child got to it
        self._put("set_terminated", run_id, status, end_time or int(time.time() * 1000))

    # -- the rest: in-process ----------------------------------------------------------------
    def create_run(self, *args, **kwargs):
        return self._client.create_run(*args, **kwargs)

    def __getattr__(self, name):
        """Reads and anything else: after the queued writes, on the in-process client."""
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.flush()
            return attr(*args, **kwargs)
        return call

    def check(self) -> None:
        """Raise now if a write done so far failed (no waiting)."""
        with self._cond:
            errors, self._errors = self._errors, []
        self._raise(errors)

    def flush(self) -> None:
        """Wait until every queued write is done; raise if one failed."""
        with self._cond:
            target = self._sent
            while self._done < target and self._proc.poll() is None:
                self._cond.wait(0.5)
            if self._done < target:
                self._errors.append(f"the MLflow writer process exited with code "
                                    f"{self._proc.returncode}; {target - self._done} write(s) "
                                    "not done")
                self._done = target
            errors, self._errors = self._errors, []
        self._raise(errors)

    def _raise(self, errors: list[str]) -> None:
        if errors:
            raise TrackingUnavailable(
                f"MLflow writes to {self.tracking_uri!r} failed: " + "; ".join(errors)
                + "\nCheck that the tracking store is reachable (MLFLOW_TRACKING_URI), then run "
                "`python -m pipeline.doctor` to find runs left incomplete.")

    def close(self) -> None:
        """Flush, then stop the child."""
        try:
            self.flush()
        finally:
            self._outbox.put(None)
            self._feeder.join()
            self._proc.wait()

    def _put(self, method: str, *args) -> None:
        with self._cond:
            self._sent += 1
        self._outbox.put((method, args))

    def _feed(self) -> None:
        pipe = self._proc.stdin
        while (item := self._outbox.get()) is not None:
            data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            try:
                pipe.write(_HEADER.pack(len(data)) + data)
                pipe.flush()
            except (BrokenPipeError, ValueError):
                return  # the child is gone; flush() reports it
        pipe.close()

    def _read(self) -> None:
        for line in self._acks:
            with self._cond:
                self._done += 1
                if text := line.decode().rstrip("\n"):
                    self._errors.append(text)
                self._cond.notify_all()


# -- the child ----------------------------------------------------------------------------------


def _perform(client, method: str, args: tuple) -> None:
    from pipeline import tracking

    if method == "log_artifacts":  # the files travelled as {relative path: bytes}
        run_id, files, artifact_path = args
        tracking.log_artifacts(client, run_id, files, artifact_path)
    elif method == "log_batch":
        run_id, metrics, params, tags = args
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    elif method in WRITES:
        getattr(client, method)(*args)
    else:
        raise ValueError(f"not a queued write: {method}")


def _serve(uri: str, ack_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # we retry, and say so
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from pipeline import spool, tracking

    # Retried, then kept in the spool for `pipeline.doctor --repair` (spool.py).
    client = spool.SpoolingClient(tracking.tracking_client())
    stdin, acks = sys.stdin.buffer, os.fdopen(ack_fd, "wb")
    told = False  # the outage is reported once: later writes are safe in the spool as well
    while header := stdin.read(_HEADER.size):
        (size,) = _HEADER.unpack(header)
        method, args = pickle.loads(stdin.read(size))
        try:
            _perform(client, method, args)
            client.flush()  # raises TrackingLost when the write went to the spool
            error = ""
        except spool.TrackingLost as err:
            error = "" if told else f"{method} on run {args[0]}: " + " ".join(str(err).split())
            told = True
        except Exception as err:  # noqa: BLE001 - reported to the parent, with the call
            error = f"{method} on run {args[0]}: {type(err).__name__}: " + " ".join(
                str(err).split())[:300]
        if acks is not None:
            try:
                acks.write(error.encode() + b"\n")
                acks.flush()
            except BrokenPipeError:  # the parent died: finish its queued writes all the same
                acks = None


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
