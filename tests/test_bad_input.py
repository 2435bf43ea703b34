"""Bad input through the real command line: `python -m pipeline.search` subprocesses (and one
`mlflow run`), each in a fresh folder with MLflow's default store there. Every wrong value must
give exit code 2, one readable message naming the field and the fix, and leave nothing behind:
no Optuna journal or database, no mlflow.db, no run, no folder.

The subprocesses are started together (four at a time) by one module fixture: each spends
seconds importing PyTorch and MLflow, and the cases are independent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial
from search_fixtures import REPO, free_port, journal, study_names, write_study

GOOD = {"name": "bad", "sampler": {"name": "random", "seed": 0}, "n_trials": 2,
        "fixed": {"schedule": "constant", "epochs": 1, "threads": 1},
        "space": {"width": {"type": "int", "low": 8, "high": 16}}}


def study(**changes) -> str:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not None})


def space(**params) -> str:
    return study(space={**GOOD["space"], **params})


# name: (study file text, or None for the shipped studies; flags; what the message must say).
# Problems of one kind share a file: the message must list each of them.
CASES = {
    "malformed YAML": ("name: bad\nspace: [\n", [], ["not valid YAML", "line 3"]),
    "unknown keys": (
        study(bogus=1, space={"width": {"type": "int", "low": 8, "hihg": 16}}), [],
        ["3 problem(s)", "bogus: unknown key (check the spelling",
         "space.width.int.hihg: unknown key", "space.width.int.high: Field required"]),
    "wrong types": (
        study(n_trials="many", space={"width": {"type": "int", "low": "small", "high": 16}}),
        [], ["n_trials: Input should be a valid integer",
             "space.width.int.low: Input should be a valid integer"]),
    "empty, inverted and log-at-zero ranges": (
        space(width={"type": "int", "low": 16, "high": 16},
              depth={"type": "int", "low": 4, "high": 1},
              l2_lambda={"type": "float", "low": 0.0, "high": 0.1, "log": True}), [],
        ["3 problem(s)", "space.width: low (16) must be below high (16)",
         "space.depth: low (4) must be below high (1)",
         "space.l2_lambda: log scale needs low > 0 (got 0)"]),
    "limits a setting cannot take": (
        study(space={**GOOD["space"], "depth": {"type": "int", "low": 1, "high": 4},
                     "dropout": {"type": "float", "low": 0.0, "high": 0.5},
                     "l2_lambda": {"type": "float", "low": 1e-5, "high": 0.1, "log": True}},
              limits={"depth": {"high": 8.5}, "dropout": {"high": 1},
                      "l2_lambda": {"low": 0, "high": 1}, "width": {"high": 12}}), [],
        ["4 problem(s)", "limits.depth.high: 8.5 is not a whole number (depth is an integer)",
         "limits.dropout.high: dropout must be < 1 (got 1)",
         "limits.l2_lambda.low: l2_lambda must be > 0 on a log scale (got 0)",
         "space.width: high (16) lies outside limits.width.high (12)"]),
    "inverted limit": (study(limits={"width": {"low": 20, "high": 10}}), [],
                       ["limits.width: low (20) must be below high (10)"]),
    "unknown dataset, sampler and pruner": (
        study(dataset="imagenet", sampler={"name": "annealing"}, pruner={"name": "patient"}),
        [], ["dataset: Input should be 'digits', 'fashion-mnist', 'mnist' or 'cifar10'",
             "sampler.name: Input should be 'qmc', 'random', 'tpe'",
             "pruner.name: Input should be 'none', 'median'"]),
    "a subset larger than the dataset's classes": (
        None, ["--study", "fashion_coarse", "--dataset", "digits"],
        ["n_per_class=1000: class 0 of this dataset's training split has only",
         "lower n_per_class or use a larger dataset"]),
    "unknown dataset flag": (study(), ["--dataset", "imagenet"],
                             ["--dataset 'imagenet' is not one of digits, fashion-mnist"]),
    "parent file that does not exist": (study(parent="nosuch"), [],
                                        ["parent: no study file", "nosuch.yaml"]),
    "parent without a completed trial": (None, ["--study", "fine"],
                                         ["parent study 'coarse' has no completed trial",
                                          "Run it first: python -m pipeline.search --study "
                                          "coarse"]),
    "transfer source that never ran": (None, ["--study", "transfer"],
                                       ["study 'transfer_source' has no finished run",
                                        "Run it first: python -m pipeline.search --study "
                                        "transfer_source"]),
    "malformed storage URL": (study(), ["--storage", "studies.txt"],
                              ["storage 'studies.txt' is not understood",
                               "Use a journal file (optuna.journal, journal:PATH)"]),
    "storage folder missing": (study(), ["--storage", "sqlite:///nodir/optuna.db"],
                               ["nodir does not exist; create it, or give another path"]),
    "unreachable storage": (study(), ["--storage", f"postgresql://nobody@127.0.0.1:{free_port()}"
                                                   "/optuna"],
                            ["cannot open Optuna storage 'postgresql://nobody@127.0.0.1:",
                             "that the database server is running and reachable"]),
    "unreachable tracking store": (study(), [], ["cannot use the MLflow tracking store "
                                                 "'http://127.0.0.1:", "start the server"]),
    "negative trial count": (study(), ["--n-trials", "-1"],
                             ["--n-trials must be at least 1 (got -1)"]),
    "negative trial count in the file": (study(n_trials=-1), [],
                                         ["n_trials: Input should be greater than or equal "
                                          "to 1"]),
    "fractional trial count": (study(), ["--n-trials", "2.5"],
                               ["--n-trials", "expected a whole number, got '2.5'"]),
}


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, hidden ones included; not the side files SQLite keeps next to
    a database that was already there (its write-ahead log)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if not p.name.endswith(("-wal", "-shm", "-journal")))


def env_for(case: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "OPTUNA_", "PIPELINE_SPOOL"))}
    env |= {"OMP_NUM_THREADS": "1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")}
    if case == "unreachable tracking store":  # nothing listens there
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    return env


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each case in its own folder: (exit code, stderr, listing before, listing after)."""
    jobs = {}
    for case, (text, flags, _) in CASES.items():
        folder = tmp_path_factory.mktemp("bad")
        argv = list(flags)
        if text is not None:
            write_study(folder, "bad", text)
            argv = ["--study", str(folder / "bad.yaml"), *flags]
        jobs[case] = (folder, argv)
    results, running, todo = {}, {}, list(jobs)
    while todo or running:
        while todo and len(running) < 4:
            case = todo.pop(0)
            folder, argv = jobs[case]
            before = listing(folder)
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.search", *argv, "--quiet"],
                                    cwd=folder, env=env_for(case), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            running[case] = (proc, before)
        case = next(iter(running))
        proc, before = running.pop(case)
        out, err = proc.communicate(timeout=600)
        results[case] = (proc.returncode, out, err, before, listing(jobs[case][0]))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_message_and_creates_nothing(outcomes, case):
    code, out, err, before, after = outcomes[case]
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert err.startswith("error: "), err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    for words in CASES[case][2]:
        assert words in err, f"{words!r} not in:\n{err}"
    assert after == before  # no journal, database, mlflow.db, mlruns/, .pipeline/ ...
    assert out == ""


def test_a_parent_with_only_failed_trials_leaves_the_storage_as_it_was(tmp_path):
    """The storage exists and holds the parent, but no completed trial of it: exit 2, the child
    study is not created, and nothing else appears (no MLflow store either)."""
    parent = optuna.create_study(study_name="coarse", storage=journal(tmp_path),
                                 direction="maximize")
    parent.add_trial(create_trial(state=TrialState.FAIL))
    before, size = listing(tmp_path), (tmp_path / "optuna.journal").stat().st_size
    proc = subprocess.run([sys.executable, "-m", "pipeline.search", "--study", "fine", "--quiet"],
                          cwd=tmp_path, env=env_for(""), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "parent study 'coarse' has no completed trial" in proc.stderr
    assert listing(tmp_path) == before
    assert (tmp_path / "optuna.journal").stat().st_size == size
    assert study_names(tmp_path) == ["coarse"]


def test_mlproject_parameter_n_trials_negative(tmp_path, empty_mlflow_db):
    """`mlflow run` creates its own run before the entry point starts, and exits 1 whenever the
    entry point fails (MLflow's CLI): that much is MLflow's. Ours: the entry point's message,
    exit 2 from the entry point (MLflow logs it as a failed run), and nothing else created:
    no Optuna storage, no run besides MLflow's own (marked FAILED)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "conda.yaml", "pyproject.toml", "pipeline", "studies"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(
            src, project / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                    if src.is_dir() else {}))
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(empty_mlflow_db, work / "mlflow.db")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    before = listing(work)
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(project), "-e", "coarse_search",
         "--env-manager", "local", "-P", "n_trials=-1"],
        cwd=work, env={**env_for(""), "MLFLOW_TRACKING_URI": uri}, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: --n-trials must be at least 1 (got -1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert listing(work) == before
    assert sorted(p.name for p in project.iterdir()) == sorted(
        ("MLproject", "conda.yaml", "pyproject.toml", "pipeline", "studies"))
    runs = MlflowClient(uri).search_runs(["0"])
    assert [(r.info.status, r.data.tags["mlflow.project.entryPoint"]) for r in runs] == [
        ("FAILED", "coarse_search")]


# -- study files that cannot be read as text ------------------------------------------------------


def _no_permission(path: Path) -> None:
    path.write_text(study())
    path.chmod(0)


def _drop_file_permission_override() -> None:
    """In the child, before it starts: take CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH out of the
    capability bounding set (prctl PR_CAPBSET_DROP), so that root, too, is refused a file it has
    no read permission on, by the kernel's own permission check."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# name: (how the file at PATH (bad.yaml) is made; what the message must say).
UNREADABLE = {
    "binary file": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256))),
                    ["is binary, not text", "is it the right file?"]),
    "UTF-16 text": (lambda p: p.write_bytes(study().encode("utf-16")),
                    ["is UTF-16 text", "save it as UTF-8"]),
    "Latin-1 text": (lambda p: p.write_bytes("name: bad\ndescription: café\n".encode("latin-1")),
                     ["is not UTF-8 text", "line 2", "save it as UTF-8"]),
    "truncated download": (lambda p: p.write_bytes(
        ("name: bad\ndescription: " + "naïve " * 3).encode()[:-4]),
        ["ends in the middle of a character", "line 2", "cut short"]),
    "control character": (lambda p: p.write_text("name: bad\ndescription: a\x07b\n"),
                          ["control character #x07 at line 2, column 15", "remove it"]),
    "folder": (lambda p: p.mkdir(), ["is a folder, not a study file"]),
    "broken symbolic link": (lambda p: p.symlink_to(p.with_name("gone.yaml")),
                             ["is a symbolic link to", "gone.yaml, which does not exist"]),
    "no read permission": (_no_permission, ["cannot be read: permission denied", "chmod u+r"]),
}


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory):
    """Each case in its own folder, two at a time: (exit code, stdout, stderr, listing before,
    listing after); None for the permission case when it cannot be provoked here."""
    jobs, results, running = list(UNREADABLE), {}, {}
    while jobs or running:
        while jobs and len(running) < 2:
            case = jobs.pop(0)
            folder = tmp_path_factory.mktemp("unreadable")
            UNREADABLE[case][0](folder / "bad.yaml")
            preexec = None
            if case == "no read permission" and os.geteuid() == 0:
                try:  # probe: can this process drop the override at all?
                    subprocess.run([sys.executable, "-c", ""], check=True,
                                   preexec_fn=_drop_file_permission_override)
                except (OSError, subprocess.SubprocessError):
                    results[case] = None
                    continue
                preexec = _drop_file_permission_override
            before = listing(folder)
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.search", "--study", str(folder / "bad.yaml"),
                 "--quiet"], cwd=folder, env=env_for(case), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
            running[case] = (proc, before, folder)
        if running:
            case = next(iter(running))
            proc, before, folder = running.pop(case)
            out, err = proc.communicate(timeout=600)
            results[case] = (proc.returncode, out, err, before, listing(folder))
    return results


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_unreadable_study_file_exits_2_with_one_message_and_creates_nothing(unreadable, case):
    if unreadable[case] is None:
        pytest.skip("running as root without CAP_SETPCAP: a file without read permission "
                    "is still readable here")
    code, out, err, before, after = unreadable[case]
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert err.startswith("error: study file ") and "bad.yaml" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line
    for words in UNREADABLE[case][1]:
        assert words in err, f"{words!r} not in:\n{err}"
    assert after == before
    assert out == ""
