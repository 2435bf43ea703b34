"""QueuedClient: MLflow writes in a child process, in order, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.tracking import TrackingUnavailable
from pipeline.tracking_writer import QueuedClient


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
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
        from pipeline import tracking
        from pipeline.tracking_writer import QueuedClient
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
