"""Cross-check an Optuna study against its MLflow runs, and repair what is safe to repair.

    python -m pipeline.doctor --study coarse                 # findings only
    python -m pipeline.doctor --study coarse --repair        # and repairs, each said
    python -m pipeline.doctor --study fine --storage sqlite:///optuna.db

Trial and run point at each other (the trial's ``mlflow_run_id`` user attribute, the run's
``pipeline.trial_number`` tag). Checked: trials without a run, runs missing from the store,
writes kept in the spool while the store was away (spool.py), trials left RUNNING by a dead
worker (stale.py), runs left RUNNING, run statuses that do not mirror the trial (complete ->
FINISHED, pruned -> KILLED, failed -> FAILED, or KILLED when interrupted), runs without a trial
and several runs for one trial.

``--repair`` replays the spool, fails (and requeues once) trials whose worker is gone, ends runs
left RUNNING as their trial ended, and marks runs that no trial points at with the tag
``pipeline.orphan`` (ending them KILLED if RUNNING). It never deletes anything and never
touches a finished run's status or a trial's result. Exit codes: 0 healthy, 1 problems remain,
2 bad input (unknown study, storage or tracking store unreachable or missing: the doctor
never makes a store).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import names
from pipeline.cli import EXIT_BAD_INPUT

MIRROR = {"COMPLETE": {"FINISHED"}, "PRUNED": {"KILLED"}, "FAIL": {"FAILED", "KILLED"}}


@dataclass
class Finding:
    check: str
    detail: str
    trial: int | None = None
    run: str | None = None
    problem: bool = True  # False: worth knowing, nothing wrong
    fix: Callable[[], str] | None = field(default=None, repr=False)  # returns what it did


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.doctor",
                                description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True,
                   help="the Optuna study name (coarse, fine, coarse-smoke, coarse-mnist, ...)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage (default: OPTUNA_STORAGE, else ./optuna.journal)")
    p.add_argument("--repair", action="store_true", help="repair what is safe, and say what")
    p.add_argument("--spool", default=None, help="spool folder (default: ./.pipeline/spool)")
    args = p.parse_args(argv)

    import optuna

    from pipeline.search import storage as storage_mod
    from pipeline.tracking import client as tracking, spool

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        spec = storage_mod.parse_storage(args.storage)
        if spec.path and not Path(spec.path).exists():
            raise storage_mod.StorageError(f"no Optuna storage at {spec.path}: give --storage "
                                           "(or OPTUNA_STORAGE) as the study was run with")
        if spec.kind == "rdb" and storage_mod.no_optuna_tables(spec):  # Optuna would create them
            raise storage_mod.StorageError(f"no Optuna storage at {spec.url}: the database "
                                           "holds no Optuna tables; give --storage (or "
                                           "OPTUNA_STORAGE) as the study was run with")
        storage = storage_mod.open_storage(spec)
        names = sorted(s.study_name for s in storage.get_all_studies())
        if args.study not in names:
            raise storage_mod.StorageError(
                f"--study {args.study!r}: no such study in {spec.url}; studies there: "
                f"{', '.join(names) or 'none'}")
        # The study ran: its store must be here; the doctor never makes one (nor, without
        # --repair, changes one).
        client = tracking.reading_client("Run the doctor where the study ran, or set "
                                         "MLFLOW_TRACKING_URI to the store it ran with.")
        if args.repair:
            client = tracking.tracking_client()
    except (storage_mod.StorageError, tracking.TrackingUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    study = optuna.load_study(study_name=args.study, storage=storage)
    folder = Path(args.spool) if args.spool else spool.spool_dir()

    findings = examine(study, spec, client, folder)
    print(f"[{args.study}] {len(study.trials)} trial(s) in {spec.url}, runs in "
          f"{client.tracking_uri}")
    show(findings)
    if args.repair:
        for f in findings:
            if f.fix is not None:
                print(f"repaired: {f.fix()}")
        findings = examine(study, spec, client, folder)
        print("after repair:")
        show(findings)
    left = [f for f in findings if f.problem]
    if left and not args.repair and any(f.fix for f in left):
        print("run again with --repair to fix what can be fixed safely")
    return 1 if left else 0


def show(findings: list[Finding]) -> None:
    import pandas as pd

    if not findings:
        print("healthy: every trial has its run, statuses mirror trial states, nothing is "
              "RUNNING without a live worker, nothing is waiting in the spool")
        return
    table = pd.DataFrame([{
        "": "problem" if f.problem else "note", "check": f.check,
        "trial": "" if f.trial is None else f.trial, "run": (f.run or "")[:12],
        "detail": f.detail, "repair": "yes" if f.fix else ""} for f in findings]).astype(str)
    # Text reads best left-aligned: pad every cell of a column to the column's width.
    table = table.apply(lambda col: col.str.ljust(max(col.str.len().max(), len(col.name))))
    print(table.to_string(index=False, justify="left"))


# -- the checks ---------------------------------------------------------------------------------


def examine(study, spec, client, folder: Path) -> list[Finding]:
    """Every finding, each with the repair that is safe for it (if any)."""
    from optuna.trial import TrialState

    from pipeline.search import liveness, stale
    from pipeline.tracking import client as tracking, spool
    from pipeline.tracking.writer import PENDING

    trials = study.get_trials(deepcopy=False)
    runs = tracking.study_runs(client, study.study_name)
    trial_runs = {r.info.run_id: r for r in runs if r.data.tags.get(names.KIND) == names.KIND_TRIAL}
    waiting = set(spool.spooled_runs(folder))
    out: list[Finding] = []

    stale_numbers = {t.number for t in stale.stale_trials(study, spec)}
    fail_stale = _fail_stale(study, spec, client)  # one repair for all of them
    # A trial whose worker died before recording its run's id (the run is made off the
    # trial's path) is matched to its run by the run's trial_number tag.
    by_number = {r.data.tags.get(names.TRIAL_NUMBER): run_id
                 for run_id, r in trial_runs.items()}
    owned: dict[str, int] = {}
    for t in trials:
        if t.state == TrialState.WAITING:
            continue  # not started: a requeued trial still carries its original's run id
        run_id = t.user_attrs.get("mlflow_run_id") or by_number.get(str(t.number))
        if run_id:
            owned[run_id] = t.number
        if t.state == TrialState.RUNNING:
            if t.number in stale_numbers:
                out.append(Finding("trial RUNNING, worker gone", "its worker stopped (no "
                                   "heartbeat, or its process is gone)", t.number, run_id,
                                   fix=fail_stale))
                fail_stale = None
            else:
                worker = t.user_attrs.get(liveness.WORKER_ATTR) or "unknown worker"
                out.append(Finding("trial RUNNING", f"held by {worker}", t.number, run_id,
                                   problem=False))
            continue
        if not run_id:
            if t.state == TrialState.FAIL and t.user_attrs.get("error"):  # said why, in Optuna
                out.append(Finding("trial without run", "failed before its run was created: "
                                   + t.user_attrs["error"][:100], t.number, problem=False))
            else:
                out.append(Finding("trial without run", f"{t.state.name} trial has no "
                                   "mlflow_run_id (its run was never created)", t.number))
            continue
        if run_id in waiting:
            out.append(Finding("spooled", f"writes of this run are waiting in {folder}",
                               t.number, run_id, fix=_replay(client, run_id, folder)))
            continue
        run = trial_runs.get(run_id) or _get_run(client, run_id)
        if run is None:
            out.append(Finding("run missing", f"run {run_id} is not in {client.tracking_uri}",
                               t.number, run_id))
            continue
        status = run.info.status
        if status == "RUNNING":
            target = _ended_status(t)
            out.append(Finding("run RUNNING", f"the trial is {t.state.name}; the run should "
                               f"be {target}", t.number, run_id,
                               fix=_terminate(client, run_id, target)))
        elif status not in MIRROR[t.state.name]:
            out.append(Finding("status mismatch", f"trial {t.state.name} but run {status} "
                               f"(expected {' or '.join(sorted(MIRROR[t.state.name]))})",
                               t.number, run_id))

    for run_id, run in trial_runs.items():
        if run_id in owned:
            continue
        number = run.data.tags.get(names.TRIAL_NUMBER)
        twin = next((r for r, n in owned.items() if str(n) == number), None)
        detail = (f"a second run for trial {number} (the trial's run is {twin[:12]})" if twin
                  else f"no trial points at it (trial_number tag {number})")
        if run.data.tags.get(names.ORPHAN):
            out.append(Finding("run without trial", detail + "; marked orphan",
                               run=run_id, problem=False))
        else:
            out.append(Finding("duplicate run" if twin else "run without trial", detail,
                               run=run_id, fix=_mark_orphan(client, run, detail)))

    running_trials = [t for t in trials if t.state == TrialState.RUNNING
                      and t.number not in stale_numbers]
    for run in runs:
        run_id = run.info.run_id
        if run.data.tags.get(names.KIND) != names.KIND_STUDY:
            continue
        if run_id in waiting:
            out.append(Finding("spooled", f"writes of the study run are waiting in {folder}",
                               run=run_id, fix=_replay(client, run_id, folder)))
        elif run.info.status != "RUNNING":
            continue
        elif running_trials:
            out.append(Finding("study run RUNNING", "trials are running", run=run_id,
                               problem=False))
        else:
            out.append(Finding("study run RUNNING", "no trial is running: its launcher is gone",
                               run=run_id, fix=_close_study_run(client, spec, study, run_id)))

    # A trial's run whose very creation was spooled (the store was away when it started): it
    # is known by its pending id and its tags only.
    for pending_id in sorted(w for w in waiting if w.startswith(PENDING)):
        first = (spool.pending(pending_id, folder) or [{}])[0]
        tags = first.get("tags") or {} if first.get("method") == "create_run" else {}
        if tags.get(names.STUDY) == study.study_name:
            out.append(Finding("spooled", f"the run of trial {tags.get(names.TRIAL_NUMBER)} "
                               f"was never made (the store was away); its creation and writes "
                               f"are waiting in {folder}", run=pending_id,
                               fix=_replay(client, pending_id, folder)))
    return out


def _ended_status(trial) -> str:
    """What a run left RUNNING should end as: its trial's mirror; a failed trial that was
    interrupted or lost its worker (no error of its own) ends KILLED, as run_trial does."""
    if trial.state.name != "FAIL":
        return sorted(MIRROR[trial.state.name])[0]
    error = trial.user_attrs.get("error", "")
    return "FAILED" if error and not error.startswith(("interrupted", "stale")) else "KILLED"


def _get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception:  # not in this store (or deleted for good)
        return None


# -- the repairs (each returns what it did) -----------------------------------------------------


def _fail_stale(study, spec, client) -> Callable[[], str]:
    def fix() -> str:
        from pipeline.search import stale

        failed = [t.number for t in stale.fail_stale(study, spec, client)]
        return (f"marked stale trial(s) {failed} failed, requeued each once with the same "
                "parameters, and ended their runs KILLED")
    return fix


def _replay(client, run_id: str, folder: Path) -> Callable[[], str]:
    def fix() -> str:
        from pipeline.tracking import spool

        n, made = spool.replay(client, run_id, folder)
        what = f"run {run_id}" if made == run_id else f"run {made} (its creation was spooled)"
        return f"wrote the {n} spooled write(s) of {what} into {client.tracking_uri}"
    return fix


def _terminate(client, run_id: str, status: str) -> Callable[[], str]:
    def fix() -> str:
        from pipeline.tracking import client as tracking

        tracking.end_run(client, run_id, status)
        return f"ended run {run_id} as {status}"
    return fix


def _mark_orphan(client, run, why: str) -> Callable[[], str]:
    def fix() -> str:
        from pipeline.tracking import client as tracking

        run_id = run.info.run_id
        tracking.set_tags(client, run_id, {names.ORPHAN: why})
        if client.get_run(run_id).info.status == "RUNNING":
            tracking.end_run(client, run_id, "KILLED")
            return f"ended run {run_id} KILLED and tagged it {names.ORPHAN}: {why}"
        return f"tagged run {run_id} {names.ORPHAN}: {why}"
    return fix


def _close_study_run(client, spec, study, run_id: str) -> Callable[[], str]:
    def fix() -> str:
        from pipeline.search import study_run
        from pipeline.tracking import client as tracking

        # Recorded as closed, so that the next launch opens a new study run instead of
        # joining this one.
        study_run.claim_close(spec, study, run_id, lambda trials: True)
        tracking.end_run(client, run_id, "KILLED")
        return f"ended study run {run_id} KILLED"
    return fix


if __name__ == "__main__":
    raise SystemExit(main())
