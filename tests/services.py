"""Real services for the scale-out tests: a PostgreSQL server and an `mlflow server` (with
MLflow's basic-auth app and --allowed-hosts, as docs/scaling-out.md shows), each started
on 127.0.0.1 on a free port by a fixture and stopped at its teardown.

PostgreSQL follows docs/scaling-out.md's commands: ``initdb`` (as the ``postgres`` user
when the tests run as root, since initdb refuses root), ``pg_ctl start`` with the socket in the
server's own folder, then one database per store. The binaries come from Debian's ``postgresql``
package (tests/install_system_deps.sh installs it).

Imported by the test modules that use them (like search_fixtures.py): conftest.py stays as is.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from search_fixtures import free_port

START_SECONDS = 120  # a cold `mlflow server` builds its schema: tens of seconds on 2 busy cores


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} not found: run `bash tests/install_system_deps.sh` "
                    "(Debian package postgresql)")
    return found


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str

    def url(self, db: str) -> str:
        """SQLAlchemy URL (postgresql:// means psycopg 3 with SQLAlchemy 2.1)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}"

    def createdb(self, db: str) -> str:
        subprocess.run([pg_bin("createdb"), "-h", self.host, "-p", str(self.port), "-U",
                        self.user, db], check=True, capture_output=True, text=True)
        return self.url(db)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own: trust authentication, 127.0.0.1 only."""
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # /tmp: readable by postgres
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres")
    data, log, port = root / "data", root / "log", free_port()
    ctl = [*run_as, pg_bin("pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*run_as, pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U",
                        "postgres"], check=True, capture_output=True, text=True)
        subprocess.run([*ctl, "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                        "-l", str(log), "-w", "start"], check=True, capture_output=True,
                       text=True)
        yield Postgres("127.0.0.1", port, "postgres")
    except subprocess.CalledProcessError as err:
        pytest.fail(f"PostgreSQL did not start: {err.stderr}\n"
                    f"{log.read_text() if log.exists() else ''}")
    finally:
        subprocess.run([*ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# Every `mlflow server` / `mlflow ui` a test starts: without MLflow's job runner, eight processes
# (a job runner, Huey consumers) for GenAI jobs this pipeline never submits, which cost some
# 10 s of CPU each time a server starts on 2 cores. Tracking and the UI's REST API are the same.
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
ADMIN = ("admin", "admin-password-for-tests")
WORKER = ("pipeline", "worker-password-for-tests")  # the workers' account
ALLOWED_HOSTS = "tracking.example.org,127.0.0.1:*,localhost:*"
# The options of the multi-machine `mlflow server` command in docs/scaling-out.md (a test keeps
# them equal: tests/test_security.py, test_readme_keeps_mlflow_on_loopback_and_guards_the_...).
SERVER_OPTIONS = ("--host", "--port", "--backend-store-uri", "--artifacts-destination",
                  "--app-name", "--allowed-hosts")


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: Path

    @staticmethod
    def credentials(account: tuple[str, str]) -> dict[str, str]:
        """The environment variables MLflow's clients authenticate with."""
        return {"MLFLOW_TRACKING_USERNAME": account[0], "MLFLOW_TRACKING_PASSWORD": account[1]}


def _health(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """docs/scaling-out.md's multi-machine `mlflow server`: on 127.0.0.1, runs in PostgreSQL,
    artifacts proxied to a folder of its own, users checked by the basic-auth app (its user
    database in PostgreSQL too), Host headers limited by --allowed-hosts; plus the workers'
    account, made by the admin as docs/scaling-out.md shows. One uvicorn worker (each imports
    MLflow: slow to start on 2 cores). Its whole process group is stopped at teardown."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    backend = postgres.createdb("mlflow")
    (folder / "basic_auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {postgres.createdb('mlflow_auth')}\n"
        "admin_username = admin\nauth_cache_ttl_seconds = 60\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "secret-for-tests",
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            **NO_JOB_RUNNER}
    log = (folder / "server.log").open("w")
    values = ["127.0.0.1", str(port), backend, str(folder / "artifacts"), "basic-auth",
              ALLOWED_HOSTS]
    command = dict(zip(SERVER_OPTIONS, values, strict=True))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *(x for kv in command.items() for x in kv),
         "--workers", "1"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _health(uri):
            logged = (folder / "server.log").read_text
            assert proc.poll() is None, f"mlflow server exited: {logged()}"
            assert time.monotonic() < deadline, f"mlflow server gave no /health: {logged()}"
            time.sleep(0.5)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in MlflowServer.credentials(ADMIN).items():
                mp.setenv(k, v)
            from mlflow.server import get_app_client

            get_app_client("basic-auth", tracking_uri=uri).create_user(*WORKER)
        yield MlflowServer(uri, folder / "artifacts")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:  # uvicorn waits for open keep-alive connections: a test server need not
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
