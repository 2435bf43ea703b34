"""QueuedClient: MLflow writes in a child process, in order, nothing lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from search_fixtures import free_port

from pipeline.tracking import client as tracking, spool
from pipeline.tracking.client import TrackingUnavailable
from pipeline.tracking.writer import PENDING, PROCESS_NAME, QueuedClient
from pipeline.training.trainer import EpochRecord


@pytest.fixture
def store(tmp_path, monkeypatch, empty_mlflow_db):
    """A copy of conftest's empty SQLite store (making the schema costs a second or two)."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracking.tracking_client()
    return client, client.create_experiment("e")


@pytest.fixture
def queued(store):
    """A QueuedClient on the store, and the experiment id; closed after the test."""
    plain, exp = store
    client = QueuedClient(plain)
    yield client, exp
    client.close()


def test_writes_land_in_order_with_artifacts_from_a_deleted_folder(queued):
    client, exp = queued
    run_id = tracking.start_run(client, exp, "r", tags={"pipeline.kind": "trial"})
    for step in range(3):  # the same key at three steps: order must survive
        client.log_batch(run_id, metrics=[Metric("m", float(step), 0, step)])
    client.log_batch(run_id, params=[Param("p", "1")], tags=[RunTag("t", "x")])
    tracking.log_artifacts(client, run_id, {"a.txt": "hello", "sub/b.bin": b"\x00\x01"})
    tracking.end_run(client, run_id, "KILLED")
    ended = int(time.time() * 1000)
    client.flush()
    run = MlflowClient().get_run(run_id)  # a separate reader
    assert run.info.status == "KILLED"
    assert run.info.end_time <= ended  # when the trial ended, not when the child wrote
    assert [m.value for m in MlflowClient().get_metric_history(run_id, "m")] == [0, 1, 2]
    assert run.data.params == {"p": "1"} and run.data.tags["t"] == "x"
    local = Path(MlflowClient().download_artifacts(run_id, "", tempfile.mkdtemp()))
    assert (local / "a.txt").read_text() == "hello"
    assert (local / "sub" / "b.bin").read_bytes() == b"\x00\x01"


def test_reads_wait_for_the_queued_writes(queued):
    client, exp = queued
    run_id = client.create_run(exp).info.run_id
    client.log_batch(run_id, metrics=[Metric(f"m{i}", i, 0, 0) for i in range(200)])
    assert len(client.get_run(run_id).data.metrics) == 200


def test_a_failed_write_is_reported_with_the_call_and_the_fix(queued):
    client, _ = queued
    client.set_terminated("0" * 32, "FINISHED")  # no such run: not retried
    with pytest.raises(TrackingUnavailable, match="(?s)set_terminated on run 0{32}.*doctor"):
        client.flush()
    client.flush()  # reported once


def test_writes_queued_by_a_killed_process_still_land(store, tmp_path):
    _, exp = store
    script = textwrap.dedent(f"""
        import os, signal, time
        from mlflow.entities import Metric
        from pipeline.tracking import client as tracking
        from pipeline.tracking.writer import QueuedClient
        client = QueuedClient(tracking.tracking_client())
        run_id = client.create_run("{exp}").info.run_id
        print(run_id, flush=True)
        client.log_batch(run_id, metrics=[Metric("m", 1.0, 0, 0)])
        client.set_terminated(run_id, "FINISHED")
        while not client._outbox.empty():  # handed to the pipe, not necessarily written
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=os.environ, timeout=120)
    assert out.returncode == -9, out.stderr
    run_id = out.stdout.split()[0]
    deadline = time.monotonic() + 60  # the orphaned writer drains its input, then exits
    while MlflowClient().get_run(run_id).info.status != "FINISHED":
        assert time.monotonic() < deadline, "the queued writes never landed"
        time.sleep(0.2)
    assert MlflowClient().get_run(run_id).data.metrics == {"m": 1.0}


def test_a_run_made_by_the_child_takes_the_writes_that_named_its_pending_id(queued):
    client, exp = queued
    parent = client.create_run(exp).info.run_id
    deadline = time.monotonic() + 60  # until then, runs are made in-process (a real id)
    while not client._ready:
        assert time.monotonic() < deadline, "the writer child never came up"
        time.sleep(0.05)
    pending = tracking.start_run_later(client, exp, "study-007", parent,
                                       {"pipeline.kind": "trial", "pipeline.study": "study",
                                        "pipeline.trial_number": "7"})
    assert pending.startswith(PENDING)
    # written before the child has made the run, under the pending id
    tracking.EpochWriter(client, pending, params={"width": 16}).flush(final={"acc": 0.5})
    tracking.log_artifacts(client, pending, {"a.txt": "hello"})
    run_id = client.run_id(pending)
    assert run_id and not run_id.startswith(PENDING)
    assert client.get_run(pending).info.run_id == run_id  # reads take the pending id too
    # a worker killed before recording the id: its RUNNING run is found by its tags
    assert tracking.find_trial_run(client, "study", 7) == run_id
    assert tracking.find_trial_run(client, "study", 8) is None
    tracking.end_run(client, pending, "FINISHED")
    client.flush()
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "study-007" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["pipeline.trial_number"] == "7"
    assert run.data.params == {"width": "16"} and run.data.metrics == {"acc": 0.5}
    assert [a.path for a in MlflowClient().list_artifacts(run_id)] == ["a.txt"]
    assert tracking.find_trial_run(MlflowClient(), "study", 7) is None  # ended: not RUNNING


def test_a_run_whose_creation_found_no_store_is_spooled_and_made_on_replay(store, tmp_path,
                                                                            monkeypatch):
    _, exp = store
    monkeypatch.chdir(tmp_path)
    gone = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
    writer = spool.SpoolingClient(gone, retry_seconds=0)
    pending = PENDING + "abc"
    tags = {"pipeline.study": "s", "pipeline.kind": "trial", "pipeline.trial_number": "3"}
    assert writer.create_run_or_spool(pending, exp, start_time=1000, tags=tags,
                                      run_name="s-003") is None
    writer.log_batch(pending, metrics=[Metric("val_acc", 0.9, 0, 5)])
    writer.set_terminated(pending, "KILLED", 2000)
    with pytest.raises(spool.TrackingLost):
        writer.flush()
    assert [r["method"] for r in spool.pending(pending)] == ["create_run", "log_batch",
                                                            "set_terminated"]
    n, run_id = spool.replay(MlflowClient(), pending)  # the store is back
    assert n == 3 and run_id != pending and spool.spooled_runs() == []
    run = MlflowClient().get_run(run_id)
    assert (run.info.run_name, run.info.status, run.info.start_time) == ("s-003", "KILLED", 1000)
    assert run.data.tags["pipeline.trial_number"] == "3" and run.data.metrics == {"val_acc": 0.9}


def test_epochs_are_written_in_batches_and_all_of_them_by_flush(store):
    client, exp = store
    run_id = client.create_run(exp).info.run_id
    records = [EpochRecord(e, 10 * e, {"val_acc": e / 10}) for e in (1, 2, 3)]
    batched = tracking.EpochWriter(client, run_id, every=3600, params={"p": 1})
    for r in records:
        batched(r)
    assert MlflowClient().get_run(run_id).data.metrics == {}  # not yet due
    batched.flush(final={"test_acc": 0.7}, final_step=30)
    history = MlflowClient().get_metric_history(run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.2), (30, 0.3)]
    assert MlflowClient().get_run(run_id).data.params == {"p": "1"}
    other = client.create_run(exp).info.run_id
    every_epoch = tracking.EpochWriter(client, other, every=0)
    every_epoch(records[0])  # due at once: written without a flush
    assert MlflowClient().get_run(other).data.metrics == {"val_acc": 0.1, "epoch": 1.0}


def test_workers_logging_the_same_new_dataset_at_once_all_succeed(store):
    """The first time a dataset is logged, every worker inserts it at once; the store refuses all
    but one insert (a unique-key conflict), and the others must retry, not fail their trial. Seen
    in CI with four workers on PostgreSQL; six threads on SQLite reproduce it every time."""
    import threading

    from mlflow.entities import Dataset, DatasetInput, InputTag

    client, exp = store
    uri = os.environ["MLFLOW_TRACKING_URI"]
    for attempt in range(2):
        runs = [client.create_run(exp).info.run_id for _ in range(6)]
        dataset = Dataset(name=f"digits-{attempt}", digest=f"d{attempt}", source_type="code",
                          source="{}")
        barrier, errors = threading.Barrier(len(runs)), []

        def log(run_id, dataset=dataset, barrier=barrier, errors=errors):
            writer = spool.SpoolingClient(MlflowClient(uri), retry_seconds=20)
            barrier.wait()
            try:
                writer.log_inputs(run_id, [DatasetInput(dataset, [InputTag("context", "train")])])
                writer.flush()
            except Exception as err:  # noqa: BLE001 - collected for the assertion
                errors.append(err)

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert all([i.dataset.digest for i in client.get_run(r).inputs.dataset_inputs]
                   == [f"d{attempt}"] for r in runs)


def _pipes_held_by(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    return {os.readlink(fd) for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:")}


def _pipe_of(fd: int) -> str:
    return f"pipe:[{os.fstat(fd).st_ino}]"


def test_a_forked_writer_holds_none_of_its_parents_pipes_or_sockets(store):
    """The writer is forked from the process that logs, and lets go of what it inherited: a
    second writer holding the first one's input would keep the first from ever seeing its end,
    and a search's helpers would never see the launcher's pool close."""
    plain, exp = store
    first = QueuedClient(plain)
    read_end, write_end = os.pipe()
    second = QueuedClient(plain)
    try:
        # both write (so each child is past letting go), and the parent's store is unharmed
        run_id = second.create_run(exp).info.run_id
        second.log_batch(run_id, metrics=[Metric("m", 2.0, 0, 0)])
        first.set_tag(run_id, "t", "v")
        first.flush()
        second.flush()
        run = plain.get_run(run_id)
        assert run.data.metrics == {"m": 2.0} and run.data.tags["t"] == "v"
        held = _pipes_held_by(second._proc.pid)
        assert _pipe_of(first._proc.stdin.fileno()) not in held
        assert _pipe_of(write_end) not in held and _pipe_of(read_end) not in held
        assert _pipe_of(second._proc.stdin.fileno()) in held  # its own input, read end
        assert not [fd for fd in Path(f"/proc/{second._proc.pid}/fd").iterdir()
                    if os.readlink(fd).startswith("socket:")]
        # named apart from its parent in ps and top
        assert Path(f"/proc/{second._proc.pid}/comm").read_text().strip() == PROCESS_NAME
    finally:
        os.close(read_end)
        os.close(write_end)
        second.close()  # first: without the letting go, second's child holds first's input
        first.close()
    assert (first._proc.returncode, second._proc.returncode) == (0, 0)
