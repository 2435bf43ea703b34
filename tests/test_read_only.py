"""Commands that only read create nothing: `python -m pipeline.report`, `pipeline.doctor` (which
never makes a store, even with --repair), `pipeline.final` and `pipeline.recheck` refused for a
study that never ran, and every command's -h, each a real subprocess in a folder whose listing
(every file's name, size and modification time; every folder's name; recursively, hidden ones
included) must be the same afterwards. Folders: empty; an empty MLflow store alone (a copy of
conftest's, in SQLite's rollback-journal mode: a client that switched it to WAL would rewrite
its header); the Optuna journal of a tiny real study without its MLflow store; and the whole
tiny study (journal, mlflow.db, mlruns/).

Folders' own modification times are not compared: a reader of a SQLite store in WAL mode makes
and removes SQLite's side files (mlflow.db-wal, -shm) next to it while it reads, which is how
SQLite reads such a store; whatever is left behind shows in the file listing.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from search_fixtures import study_names, write_study

COMMANDS = ("search", "train", "report", "final", "doctor", "recheck")
TINY = ('{"name": "tiny", "sampler": {"name": "random", "seed": 0}, "n_trials": 2, '
        '"fixed": {"schedule": "constant", "epochs": 1, "batch_size": 64, "threads": 1}, '
        '"space": {"width": {"type": "int", "low": 8, "high": 16}}}')
NO_STORE = "MLflow tracking store"  # ... 'sqlite:///mlflow.db' does not exist ...

# folder: [(argv, exit code, words the one-line message must hold)]; every -h is added below.
CASES = {
    "empty": [
        (["report", "--study", "coarse"], 2, [NO_STORE, "does not exist"]),
        (["final", "--study", "coarse"], 2, [NO_STORE, "does not exist", "Run it first"]),
        (["doctor", "--study", "coarse"], 2, ["no Optuna storage at optuna.journal"]),
        (["recheck", "--study", "coarse", "--quiet"], 2,
         ["no completed trial", "Run it first"]),
    ],
    "store only": [
        (["report", "--study", "coarse"], 2, ["no study 'coarse'", "Run it first"]),
        (["final", "--study", "coarse"], 2, ["no finished run", "Run it first"]),
        (["recheck", "--study", "coarse", "--quiet"], 2,
         ["no completed trial", "Run it first"]),
    ],
    "journal only": [
        (["doctor", "--study", "tiny"], 2, [NO_STORE, "does not exist"]),
        (["doctor", "--study", "tiny", "--repair"], 2, [NO_STORE, "does not exist"]),
        (["report", "--study", "tiny"], 2, [NO_STORE, "does not exist"]),
        (["final", "--study", "tiny.yaml"], 2, [NO_STORE, "does not exist"]),
    ],
    "studied": [
        (["report", "--study", "nosuch"], 2, ["no study 'nosuch'", "Studies found: tiny"]),
        (["doctor", "--study", "nosuch"], 2, ["no such study in optuna.journal"]),
        (["doctor", "--study", "tiny"], 0, ["healthy"]),
        (["final", "--study", "coarse"], 2, ["no finished run", "Run it first"]),
        (["recheck", "--study", "coarse", "--quiet"], 2,
         ["no completed trial", "Run it first"]),
    ],
}
for _folder in ("empty", "studied"):
    CASES[_folder] += [([command, "-h"], 0, ["usage: python -m pipeline." + command])
                       for command in COMMANDS]
RUNS = [(folder, i) for folder, cases in CASES.items() for i in range(len(cases))]


def listing(folder: Path) -> list[tuple]:
    """Every path under ``folder``: files with their size and modification time, folders by
    name (see the module doc)."""
    out = []
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        kind = "dir" if p.is_dir() and not p.is_symlink() else "file"
        out.append((str(p.relative_to(folder)), kind)
                   + ((st.st_size, st.st_mtime_ns) if kind == "file" else ()))
    return out


def env() -> dict:
    """This environment (offline, its data cache) without any store setting: each command
    finds its stores by their defaults, ./optuna.journal and ./mlflow.db."""
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "OPTUNA_", "PIPELINE_SPOOL"))}
    return out | {"OMP_NUM_THREADS": "1",
                  "PATH": os.path.dirname(sys.executable) + os.pathsep + out.get("PATH", "")}


def fold_wal(db: Path) -> None:
    """Write SQLite's write-ahead log into the store and remove it: the state any clean close
    leaves (the search's processes exit without closing their connections)."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    assert not db.with_name(db.name + "-wal").exists()


@pytest.fixture(scope="module")
def studied(tmp_path_factory, empty_mlflow_db) -> Path:
    """A tiny real study (two one-epoch trials) run by `python -m pipeline.search`."""
    folder = tmp_path_factory.mktemp("studied")
    shutil.copyfile(empty_mlflow_db, folder / "mlflow.db")
    write_study(folder, "tiny", TINY)
    proc = subprocess.run([sys.executable, "-m", "pipeline.search", "--study", "tiny.yaml",
                           "--quiet"], cwd=folder, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fold_wal(folder / "mlflow.db")
    assert study_names(folder) == ["tiny"]
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, studied, empty_mlflow_db):
    """A fresh copy of each kind of folder per case (copies keep modification times)."""
    def make(kind: str) -> Path:
        folder = tmp_path_factory.mktemp(kind.replace(" ", "-"))
        if kind == "store only":
            shutil.copy2(empty_mlflow_db, folder / "mlflow.db")
        elif kind in ("journal only", "studied"):
            shutil.copytree(studied, folder, symlinks=True, dirs_exist_ok=True)
            if kind == "journal only":
                (folder / "mlflow.db").unlink()
        return folder
    return make


@pytest.fixture(scope="module")
def outcomes(folders):
    """Every case, two at a time: (exit code, stdout, stderr, listing before, after)."""
    jobs = {}
    for folder_kind, i in RUNS:
        jobs[(folder_kind, i)] = folders(folder_kind)
    results, running, todo = {}, {}, list(jobs)
    while todo or running:
        while todo and len(running) < 2:
            key = todo.pop(0)
            argv = CASES[key[0]][key[1]][0]
            before = listing(jobs[key])
            proc = subprocess.Popen([sys.executable, "-m", f"pipeline.{argv[0]}", *argv[1:]],
                                    cwd=jobs[key], env=env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            running[key] = (proc, before)
        key = next(iter(running))
        proc, before = running.pop(key)
        out, err = proc.communicate(timeout=600)
        results[key] = (proc.returncode, out, err, before, listing(jobs[key]))
    return results


@pytest.mark.parametrize("folder, i", RUNS,
                         ids=[f"{f}: {' '.join(CASES[f][i][0])}" for f, i in RUNS])
def test_a_read_only_command_leaves_the_folder_as_it_was(outcomes, folder, i):
    argv, expected, words = CASES[folder][i]
    code, out, err, before, after = outcomes[(folder, i)]
    assert code == expected, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert after == before  # no mlflow.db, optuna.journal, .pipeline/, mlruns/, report ...
    assert "Traceback" not in err, err
    if expected == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
        assert out == ""
    text = err if expected == 2 else out
    for word in words:
        assert word in text, f"{word!r} not in:\n{text}"
