"""MLflow writes in a child process, so that training never waits for the tracking store.

A trial's MLflow writes (its epoch metrics, artifacts and final status: one `log_batch`, one
`log_artifacts`, one `set_terminated`) cost 25 to 45 ms of CPU on SQLite, as much as 10 % of a
digits trial. MLflow's own asynchronous logging runs them in a thread of the training process,
which competes with training for the GIL (measured slower here than writing synchronously).
`QueuedClient` hands the writes, in order, to a child process and returns at once; on a machine
whose cores are not all training, the writes cost the trainer nothing.

The child is forked (`_fork_writer`), not started afresh: the parent has imported MLflow already,
and a fresh interpreter importing it again cost about 3 s of CPU per command (and per search
worker). A fork copies what a child must not use, so the child first lets go of it
(`_detach`): the parent's signal handlers, its database connection pools (never closed in the
child: closing an inherited SQLite or PostgreSQL connection would act on the parent's), and the
pipes and sockets it inherited (replaced by /dev/null, so that a pipe the parent closes reaches
end-of-file at its reader, and a socket is never written by two processes).

- A trial's run is created in the child too (`create_run_later`, about 3 to 6 ms of SQLite a
  trial that training no longer waits for): the call returns a *pending id* at once, which every
  later write may name; the child swaps in the real id. `run_id(pending)` gives the real id
  once the child has made the run (the trial records it at an epoch's end, or at its own).
  Other run creation and every read go to an in-process client; a read first waits for the
  queue to drain (reads see the writes) and may name a pending id too.
- `flush()` waits until every queued write is done and raises `TrackingUnavailable` naming the
  call that failed; a failed write is retried first (a restarting server;
  `pipeline.tracking.spool`), then kept in the spool (spool.py) for
  `python -m pipeline.doctor --repair` to replay.
- The child ignores Ctrl-C and stops only when its input ends, after the last write: a worker
  that is interrupted or killed loses none of the writes it had queued.

Usage: `client = QueuedClient(tracking.tracking_client())`, then pass it wherever an
`MlflowClient` goes (`pipeline.tracking` calls only `create_run`, `log_batch`, `log_artifacts`,
`set_tag` and `set_terminated`); `client.close()` at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import signal
import stat
import struct
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from pipeline import gc_policy

WRITES = ("log_batch", "log_artifacts", "log_inputs", "set_tag", "set_terminated")
PROCESS_NAME = "mlflow-writer"  # the child's name in ps and top (/proc/PID/comm)
PENDING = "pending-"  # prefix of the ids create_run_later hands out
READY = {"ready": True}  # the child's first message
# The child's writes are off the training path: when training holds every core (torch runs a
# thread per core), the scheduler should favour training, since a thread of a multi-threaded
# matmul held up by a write holds up the others at the next barrier. (Measured with a write
# per epoch, benchmarks/train_speed.py: 0.946 -> 0.953 of the plain loop, within its noise;
# fewer writes, tracking.EpochWriter, did more.)
NICENESS = 10
_HEADER = struct.Struct("!I")


class QueuedClient:
    """An `MlflowClient` whose writes run in order in a child process (see the module doc)."""

    def __init__(self, client):
        self._client = client  # in-process: run creation and reads
        self.tracking_uri = client.tracking_uri
        self._proc, ack_read = _fork_writer(client.tracking_uri)
        self._acks = os.fdopen(ack_read, "rb")
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sent = self._done = 0
        self._errors: list[str] = []
        self._ids: dict[str, str | None] = {}  # pending id -> run id (None: spooled)
        self._ready = False  # the child has imported MLflow and opened the store
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

    def log_inputs(self, run_id, datasets=None):
        self._put("log_inputs", run_id, list(datasets or []))

    def set_terminated(self, run_id, status=None, end_time=None):
        # the time the run really ended, not when the child got to it
        self._put("set_terminated", run_id, status, end_time or int(time.time() * 1000))

    def create_run_later(self, experiment_id, run_name=None, tags=None) -> str:
        """Queue the creation of a run; returns a pending id that the queued writes (and reads)
        may use in its place. The run starts now, whenever the child gets to it.

        While the child is still starting (importing MLflow takes about a second), the run is
        made here instead and its real id returned: waiting for the child would cost more."""
        if not self._ready:
            return self._client.create_run(experiment_id, run_name=run_name,
                                           tags=dict(tags or {})).info.run_id
        pending = f"{PENDING}{uuid.uuid4().hex}"
        self._put("create_run", pending, experiment_id, run_name, dict(tags or {}),
                  int(time.time() * 1000))
        return pending

    def run_id(self, run_id: str, wait: bool = True) -> str | None:
        """The real id behind a pending one (other ids are returned as they are). None: not
        made yet (``wait=False``), or its creation failed and went to the spool with the run's
        writes, under the pending id (``python -m pipeline.doctor --repair`` makes it)."""
        if not run_id.startswith(PENDING):
            return run_id
        with self._cond:
            while wait and run_id not in self._ids and self._proc.poll() is None:
                self._cond.wait(0.5)
            return self._ids.get(run_id)

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
            args = [self._ids.get(a) or a if isinstance(a, str) else a for a in args]
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
        from pipeline.tracking.client import TrackingUnavailable

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
            message = json.loads(line)
            if message == READY:
                self._ready = True
                continue
            error, made = message
            with self._cond:
                self._done += 1
                if error:
                    self._errors.append(error)
                if made:  # [pending id, run id or None]
                    self._ids[made[0]] = made[1]
                self._cond.notify_all()


# -- the child ----------------------------------------------------------------------------------


class _Child:
    """The forked writer: as much of `subprocess.Popen` as QueuedClient uses."""

    def __init__(self, pid: int, stdin):
        self.pid, self.stdin, self.returncode = pid, stdin, None
        self._lock = threading.Lock()  # flush() polls while close() may wait

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        return self._reap(0)

    def _reap(self, options: int) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, options)
                except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler): it is gone
                    pid, status = self.pid, 255 << 8
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode


def _name_process(name: str) -> None:
    """Tell the writer from its parent in ps and top (Linux's process name; its command line
    stays the parent's)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _fork_writer(uri: str) -> tuple[_Child, int]:
    """Fork the child that serves the writes; returns it and the end of its acknowledgements."""
    in_read, in_write = os.pipe()
    ack_read, ack_write = os.pipe()  # not stdout: MLflow may print there
    for stream in (sys.stdout, sys.stderr):  # or the child would print the parent's buffer again
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:  # the child: it never returns to the parent's code
        code = 1
        try:
            _detach(keep=(in_read, ack_write))
            _serve(uri, in_read, ack_write)
            code = 0
        except BaseException:  # noqa: BLE001 - the parent reports the exit code
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(in_read)
    os.close(ack_write)
    return _Child(pid, os.fdopen(in_write, "wb")), ack_read


def _detach(keep: tuple[int, ...]) -> None:
    """In the just-forked child: drop what belongs to the parent (see the module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handlers
    _name_process(PROCESS_NAME)
    gc_policy.freeze_inherited()
    from pipeline.tracking import client as tracking

    tracking.forget_inherited_connections()
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/dev/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep or fd == devnull:
            continue
        with contextlib.suppress(OSError):  # the listing's own descriptor is closed already
            if stat.S_ISFIFO(mode := os.fstat(fd).st_mode) or stat.S_ISSOCK(mode):
                os.dup2(devnull, fd)
    os.close(devnull)


def _perform(client, method: str, args: tuple) -> str | None:
    """One queued call; a create_run returns the new run's id (None: spooled)."""
    from pipeline.tracking import client as tracking

    if method == "create_run":
        pending, experiment_id, run_name, tags, start_time = args
        return client.create_run_or_spool(pending, experiment_id, start_time=start_time,
                                          tags=tags, run_name=run_name)
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
    return None


def _serve(uri: str, in_fd: int, ack_fd: int) -> None:
    os.nice(NICENESS)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # we retry, and say so
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from pipeline.tracking import client as tracking, spool

    # Retried, then kept in the spool for `pipeline.doctor --repair` (spool.py).
    client = spool.SpoolingClient(tracking.tracking_client())
    stdin, acks = os.fdopen(in_fd, "rb"), os.fdopen(ack_fd, "wb")
    with contextlib.suppress(Exception):  # connect now; a store that is away shows up later
        with tracking.quick_requests():
            client.search_experiments(max_results=1)
    try:
        acks.write(json.dumps(READY).encode() + b"\n")
        acks.flush()
    except BrokenPipeError:  # the parent died already: its queued writes still land
        acks = None
    told = False  # the outage is reported once: later writes are safe in the spool as well
    ids: dict[str, str] = {}  # pending id -> run id (the pending id itself: spooled)
    while header := stdin.read(_HEADER.size):
        (size,) = _HEADER.unpack(header)
        method, args = pickle.loads(stdin.read(size))
        created = method == "create_run"
        made = [args[0], None] if created else None  # the parent waits for it, even on errors
        if not created and args[0] in ids:
            args = (ids[args[0]], *args[1:])
        try:
            run_id = _perform(client, method, args)
            if created and run_id:
                made[1] = ids[args[0]] = run_id
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
                acks.write(json.dumps([error, made]).encode() + b"\n")
                acks.flush()
            except BrokenPipeError:  # the parent died: finish its queued writes all the same
                acks = None
