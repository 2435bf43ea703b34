"""Synthetic studies written straight into a real MLflow store with ``MlflowClient`` (no training),
for the report-stage tests and the report benchmark (kept apart from conftest.py).

A study is what ``pipeline.engine`` and ``pipeline.objective`` log, reproduced by hand: a study run
(tags ``pipeline.kind=study`` / ``pipeline.study``, ``study.*`` and ``fixed.*`` params,
``study.yaml``, ``search_space.json``, ``summary.json`` and, for a child study, ``narrowing.json``)
and one nested trial run per trial (every training setting as a param, per-epoch metrics at
step = optimiser updates, final metrics, status FINISHED / KILLED / FAILED, and for the best trial
``config.json``, ``confusion_matrix.csv``, ``test_predictions.npy`` and ``history.csv``).
Each trial is one literal row, so every number a report shows is known by construction.

    python - <<'EOF'   # a 500-trial study in ./mlflow.db, as benchmarks/report_speed.py builds
    import sys; sys.path.insert(0, "tests")
    from mlflow.tracking import MlflowClient
    from report_fixtures import build_study, synthetic_trials
    build_study(MlflowClient("sqlite:///mlflow.db"), "big", synthetic_trials(500))
    EOF
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import math
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

STEPS_PER_EPOCH = 12  # digits: 1,149 training examples in batches of 100 -> 12 updates an epoch
DIGITS_TEST_SIZE = 360  # the fixed stratified 20 % test split of the 1,797 digits
EXPERIMENT = "synthetic-studies"
T0_MS = 1_700_000_000_000  # study runs start here; trial k starts at T0 + 1 s + k * 10 s
LAYERS = ("fc1", "fc2", "out")

# The settings every synthetic trial shares (logged as the study's `fixed.*` params).
FIXED = {"batch_size": 100, "step_size_epochs": 1, "eta_min": 1e-5, "schedule": "cyclical",
         "depth": 2, "optimizer": "sgd"}

# The coarse search space: float log, int and categorical parameters.
SPACE = {
    "l2_lambda": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "eta_max": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "width": {"type": "int", "low": 16, "high": 256, "log": False, "step": 1},
    "cycles": {"type": "int", "low": 1, "high": 3, "log": False, "step": 1},
    "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
}


@dataclass(frozen=True)
class SynTrial:
    """One trial as logged. ``value``: the objective (best val_acc) of a complete trial, the last
    val_acc of a pruned one, None for a failure before its first epoch."""

    number: int
    state: str  # complete | pruned | failed
    epochs_run: int
    value: float | None
    test_acc: float | None
    params: dict

    @property
    def epochs_planned(self) -> int:
        return 2 * FIXED["step_size_epochs"] * self.params["cycles"]

    @property
    def wall_seconds(self) -> float:
        return 2.0 + self.number % 3  # end_time - start_time of the run

    @property
    def n_params(self) -> int:
        w = self.params["width"]
        return 64 * w + w + w * w + w + w * 10 + 10  # 64 -> w -> w -> 10 (depth 2)

    def val_accs(self) -> list[float]:
        """val_acc at each epoch run. Complete: the peak (= value) one epoch before the end, so
        the objective (the best epoch) differs from the last epoch. Pruned: rising to value."""
        k = self.epochs_run
        if self.state == "complete":
            peak = max(k - 1, 1)
            return [self.value - 0.03 * (peak - e) if e <= peak else self.value - 0.01
                    for e in range(1, k + 1)]
        return [self.value - 0.03 * (k - e) for e in range(1, k + 1)]


def trial(number, state, epochs_run, value, test_acc, l2_lambda, eta_max, width, cycles,
          activation) -> SynTrial:
    return SynTrial(number, state, epochs_run, value, test_acc,
                    {"l2_lambda": l2_lambda, "eta_max": eta_max, "width": width,
                     "cycles": cycles, "activation": activation})


# -- literal studies the tests check against --------------------------------------------------

# number, state, epochs run, value, test_acc, l2_lambda, eta_max, width, cycles, activation
COARSE = [
    trial(0, "complete", 2, 0.80, 0.78, 1e-2, 0.05, 32, 1, "relu"),
    trial(1, "complete", 4, 0.93, 0.91, 2e-5, 0.2, 128, 2, "relu"),
    trial(2, "pruned", 1, 0.40, None, 5e-2, 0.002, 16, 3, "tanh"),  # planned 6: saved 5
    trial(3, "complete", 6, 0.97, 0.95, 1.2e-5, 0.3, 200, 3, "relu"),  # best (tie: earlier wins)
    trial(4, "failed", 0, None, None, 1e-3, 0.01, 64, 2, "tanh"),
    trial(5, "complete", 2, 0.85, 0.86, 3e-4, 0.08, 48, 1, "tanh"),
    trial(6, "pruned", 2, 0.55, None, 8e-2, 0.9, 24, 2, "relu"),  # planned 4: saved 2
    trial(7, "complete", 4, 0.97, 0.96, 1.5e-5, 0.25, 160, 2, "relu"),
    trial(8, "complete", 2, 0.60, 0.58, 5e-3, 0.004, 20, 1, "tanh"),
    trial(9, "complete", 6, 0.90, 0.88, 3e-5, 0.15, 96, 3, "relu"),
]

# A child of COARSE; its space is narrow_space() around COARSE's top 3 (trials 3, 7, 1), and
# its parameters lie inside that narrowed space.
FINE = [
    trial(0, "complete", 6, 0.975, 0.955, 1.2e-5, 0.3, 200, 3, "relu"),  # seeded: coarse #3
    trial(1, "complete", 4, 0.96, 0.95, 1.5e-5, 0.25, 160, 2, "relu"),  # seeded: coarse #7
    trial(2, "complete", 4, 0.94, 0.93, 2e-5, 0.2, 128, 2, "relu"),  # seeded: coarse #1
    trial(3, "pruned", 1, 0.50, None, 1.1e-5, 0.19, 120, 3, "relu"),  # planned 6: saved 5
    trial(4, "complete", 6, 0.98, 0.975, 1.3e-5, 0.28, 180, 3, "relu"),  # best
    trial(5, "failed", 0, None, None, 2.2e-5, 0.33, 215, 1, "relu"),
]

ALL_FAILED = [trial(n, "failed", 0, None, None, 1e-3, 0.01, 64, 2, "relu") for n in range(3)]


def synthetic_trials(n: int, seed: int = 0) -> list[SynTrial]:
    """``n`` trials spread over SPACE (for the benchmark): about 70 % complete, 20 % pruned,
    10 % failed; a unique best."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        cycles = int(rng.integers(1, 4))
        state = "failed" if k % 10 == 4 else "pruned" if k % 10 in (2, 7) else "complete"
        planned = 2 * cycles
        run = {"complete": planned, "pruned": int(rng.integers(1, planned)), "failed": 0}[state]
        value = None if state == "failed" else round(float(rng.uniform(0.3, 0.95)), 4)
        test = round(float(rng.uniform(0.3, 0.95)), 4) if state == "complete" else None
        out.append(trial(k, state, run, value, test, float(10 ** rng.uniform(-5, -1)),
                         float(10 ** rng.uniform(-3, 0)), int(rng.integers(16, 257)), cycles,
                         str(rng.choice(["relu", "tanh"]))))
    best = next(i for i, t in enumerate(out) if t.state == "complete")
    out[best] = replace(out[best], value=0.99, test_acc=342 / 360)
    return out


# -- the builder ----------------------------------------------------------------------------------


@dataclass
class BuiltStudy:
    key: str
    run_id: str
    trials: list[SynTrial]
    space: dict
    narrowing: dict | None
    trial_runs: dict[int, str] = field(default_factory=dict)  # number -> run id

    @property
    def best(self) -> SynTrial:
        done = [t for t in self.trials if t.state == "complete"]
        return min(done, key=lambda t: (-t.value, t.number))


def experiment_id(client: MlflowClient, folder: Path) -> str:
    """The synthetic studies' experiment, with its artifacts under ``folder`` (not the cwd)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())


def narrowing_for(parent: list[SynTrial], top_k: int = 3) -> dict:
    """The narrowing record the engine would compute from ``parent`` (and log as narrowing.json)."""
    from pipeline.search.narrow import narrow_space

    done = [{"number": t.number, "value": t.value, "params": t.params}
            for t in parent if t.state == "complete"]
    return narrow_space(SPACE, done, "maximize", top_k=top_k, margin=0.25, boundary_fraction=0.1,
                        enqueue=3)


def digits_test_labels() -> np.ndarray:
    from pipeline.training.data import load_splits

    labels = load_splits("digits").y_test.numpy()
    assert len(labels) == DIGITS_TEST_SIZE
    return labels


def build_study(client: MlflowClient, key: str, trials: list[SynTrial], *,
                parent: str | None = None, narrowing: dict | None = None,
                folder: Path | None = None, sampler: str = "qmc") -> BuiltStudy:
    """Write one study (its run and its trials' runs) into ``client``'s store; returns what was
    written. ``narrowing`` (a narrow_space record): the study searches its space and logs it.
    Artifacts go under ``folder`` (default: the working directory)."""
    from pipeline.search import space as space_mod

    folder = Path(folder or Path.cwd()).resolve()
    exp = experiment_id(client, folder)
    space = space_mod.to_plain(space_mod.from_plain(narrowing["space"] if narrowing else SPACE))
    n = len(trials)
    study_run = client.create_run(exp, start_time=T0_MS, run_name=key, tags={
        "pipeline.kind": "study", "pipeline.study": key, "pipeline.parent_study": parent or "",
        "pipeline.optuna_storage": "journal:///synthetic", "pipeline.dataset": "digits",
        **{f"pipeline.boundary.{p}": e for p, e in (narrowing or {}).get("boundary_flags",
                                                                          {}).items()}})
    run_id = study_run.info.run_id
    built = BuiltStudy(key, run_id, list(trials), space, narrowing)
    params = {"study.sampler": sampler, "study.sampler_seed": 0, "study.pruner": "median",
              "study.n_trials": n, "study.dataset": "digits", "study.metric": "val_acc",
              "study.direction": "maximize", "study.parent": parent or "",
              **{f"fixed.{k}": v for k, v in FIXED.items()}}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    labels = digits_test_labels() if any(t.state == "complete" for t in trials) else None
    for t in trials:
        built.trial_runs[t.number] = _log_trial(client, exp, key, run_id, t, cfg_for(t))

    files = {"study.yaml": yaml.safe_dump(
                 {"name": key, "dataset": "digits", "sampler": {"name": sampler, "seed": 0},
                  "objective": {"metric": "val_acc", "direction": "maximize"}, "n_trials": n,
                  "fixed": FIXED, **({"parent": parent} if parent else {"space": SPACE})}),
             "search_space.json": json.dumps(space, indent=2)}
    if narrowing:
        files["narrowing.json"] = json.dumps({**{k: v for k, v in narrowing.items()
                                                 if k != "space"}, "parent": parent,
                                              "space": space}, indent=2)
    counts = {s: sum(t.state == s for t in trials) for s in ("complete", "pruned", "failed")}
    summary = {"n_trials": n, "n_complete": counts["complete"], "n_pruned": counts["pruned"],
               "n_failed": counts["failed"], "n_running": 0, "best": None}
    metrics = {"n_complete": counts["complete"], "n_pruned": counts["pruned"],
               "n_failed": counts["failed"]}
    if counts["complete"]:
        b = built.best
        summary["best"] = {"number": b.number, "value": b.value, "params": b.params,
                           "test_acc": b.test_acc, "mlflow_run_id": built.trial_runs[b.number]}
        metrics |= {"best_val_acc": b.value, "best_trial": b.number, "test_acc": b.test_acc}
        client.log_batch(run_id, params=[Param(f"best.{k}", str(v))
                                         for k, v in b.params.items()])
        _log_best_artifacts(client, built.trial_runs[b.number], b, cfg_for(b), labels)
    files["summary.json"] = json.dumps(summary, indent=2)
    _log_files(client, run_id, files)
    client.log_batch(run_id, metrics=[Metric(k, float(v), T0_MS, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, "FINISHED", end_time=T0_MS + 1000 + 10_000 * (n + 1))
    return built


def cfg_for(t: SynTrial) -> dict:
    from pipeline.config import TrainConfig

    return TrainConfig(dataset="digits", seed=t.number, **FIXED, **t.params).model_dump()


def epoch_metrics(t: SynTrial) -> list[dict]:
    """The per-epoch records of a trial: step = updates so far, as the trainer logs them."""
    rows = []
    for e, val in enumerate(t.val_accs(), start=1):
        rows.append({"step": e * STEPS_PER_EPOCH, "epoch": e, "val_acc": val,
                     "train_acc": min(1.0, val + 0.02), "val_loss": 1.1 - val,
                     "val_cost": 1.1 - val + 0.01, "train_loss": 1.0 - val,
                     "train_cost": 1.0 - val + 0.01, "lr": t.params["eta_max"] / e,
                     "samples_per_sec": 50_000.0,
                     **{f"grad_norm/{layer}": 10.0 ** -i / e for i, layer in enumerate(LAYERS)}})
    return rows


def _log_trial(client, exp, key, parent_run, t: SynTrial, cfg: dict) -> str:
    start = T0_MS + 1000 + 10_000 * t.number
    tags = {"pipeline.kind": "trial", "pipeline.study": key,
            "pipeline.trial_number": str(t.number), "mlflow.parentRunId": parent_run}
    run_id = client.create_run(exp, start_time=start, run_name=f"{key}-{t.number:03d}",
                               tags=tags).info.run_id
    params = [Param(k, "None" if v is None else str(v)) for k, v in sorted(cfg.items())]
    params.append(Param("trial_number", str(t.number)))
    metrics = [Metric(k, float(v), start, row["step"])
               for row in epoch_metrics(t) for k, v in row.items() if k != "step"]
    run_tags = []
    if t.state == "complete":
        last = t.val_accs()[-1]
        final = {"best_val_acc": t.value, "best_epoch": float(max(t.epochs_run - 1, 1)),
                 "test_acc": t.test_acc, "test_loss": 1.0 - t.test_acc, "final_val_acc": last,
                 "final_train_acc": min(1.0, last + 0.02), "n_params": float(t.n_params),
                 "train_seconds": t.wall_seconds - 0.5, "diverged": 0.0, "objective": t.value}
        metrics += [Metric(k, float(v), start, t.epochs_run * STEPS_PER_EPOCH)
                    for k, v in final.items()]
    elif t.state == "pruned":
        run_tags.append(RunTag("pipeline.pruned", f"pruned at epoch {t.epochs_run}"))
    client.log_batch(run_id, metrics=metrics, params=params, tags=run_tags)
    if t.state == "failed":
        _log_files(client, run_id, {"error.txt": "Traceback (most recent call last):\n"
                                                 "RuntimeError: synthetic failure\n"})
    status = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[t.state]
    client.set_terminated(run_id, status, end_time=start + int(t.wall_seconds * 1000))
    return run_id


def predictions_for(t: SynTrial, labels: np.ndarray) -> np.ndarray:
    """Test predictions with exactly the trial's test accuracy: the first wrong ones are y + 1."""
    wrong = round((1.0 - t.test_acc) * len(labels))
    if not math.isclose((len(labels) - wrong) / len(labels), t.test_acc, abs_tol=1e-9):
        raise ValueError(f"test_acc {t.test_acc} is not k/{len(labels)}")
    preds = labels.astype(np.int16).copy()
    preds[:wrong] = (preds[:wrong] + 1) % 10
    return preds


def _log_best_artifacts(client, run_id: str, t: SynTrial, cfg: dict, labels: np.ndarray) -> None:
    import pandas as pd

    preds = predictions_for(t, labels)
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    classes = [str(c) for c in range(10)]
    buf = io.BytesIO()
    np.save(buf, preds, allow_pickle=False)
    history = pd.DataFrame(epoch_metrics(t)).to_csv(index=False)
    from pipeline.training.artifacts import examples_npz
    from pipeline.training.data import load_splits

    _log_files(client, run_id, {
        "examples.npz": examples_npz(load_splits("digits"), preds),
        "config.json": json.dumps(cfg, indent=2), "history.csv": history,
        "confusion_matrix.csv": pd.DataFrame(cm, index=classes, columns=classes).to_csv(),
        "test_predictions.npy": buf.getvalue()})


def _log_files(client, run_id: str, files: dict[str, str | bytes]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="syn-artifacts-"))
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        client.log_artifacts(run_id, str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- fixtures ------------------------------------------------------------------------------------


@dataclass
class SyntheticStore:
    folder: Path
    uri: str
    client: MlflowClient
    studies: dict[str, BuiltStudy]


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory, empty_mlflow_db) -> SyntheticStore:
    """A tracking store holding: syn-coarse (COARSE), syn-fine (FINE, child of syn-coarse with
    narrowing.json), syn-empty (a study run without trials) and syn-failed (every trial failed)."""
    folder = tmp_path_factory.mktemp("synthetic-store")
    shutil.copyfile(empty_mlflow_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    studies = {
        "syn-coarse": build_study(client, "syn-coarse", COARSE, folder=folder),
        "syn-fine": build_study(client, "syn-fine", FINE, parent="syn-coarse",
                                narrowing=narrowing_for(COARSE), folder=folder, sampler="tpe"),
        "syn-empty": build_study(client, "syn-empty", [], folder=folder),
        "syn-failed": build_study(client, "syn-failed", ALL_FAILED, folder=folder),
    }
    return SyntheticStore(folder, uri, client, studies)


# -- a real headless Chromium, driven over the DevTools protocol on a pipe ------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync")

# Resolves once every image has finished decoding (or failed to), then describes each one.
IMAGES_JS = """Promise.all(Array.from(document.images, i => i.decode().catch(() => null))).then(
  () => Array.from(document.images, i => ({alt: i.alt, complete: i.complete,
                                           width: i.naturalWidth, height: i.naturalHeight})))"""


# The page's widths (a horizontal overflow makes scrollWidth exceed clientWidth) and whether each
# in-page link (href="#id") finds its element.
LAYOUT_JS = """(() => {
  const root = document.documentElement;
  const links = Array.from(document.querySelectorAll('a[href^="#"]'), a => {
    const id = decodeURIComponent(a.getAttribute('href').slice(1));
    return {href: a.getAttribute('href'), found: document.getElementById(id) !== null};
  });
  return {scrollWidth: root.scrollWidth, clientWidth: root.clientWidth,
          innerWidth: window.innerWidth, bodyScrollWidth: document.body.scrollWidth, links};
})()"""


@dataclass
class PageCheck:
    title: str
    images: list[dict]  # alt, complete, width, height (natural size)
    errors: list[str]  # console errors, uncaught exceptions, browser log errors


class HeadlessChromium:
    """Chromium with ``--remote-debugging-pipe``: DevTools protocol messages are NUL-terminated
    JSON on the browser's fds 3 (in) and 4 (out). No WebSocket client (no extra package), no
    port, nothing reachable from outside."""

    def __init__(self, executable: str, user_data_dir: Path, log: Path):
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        # bash (not sh: dash cannot redirect fds above 9) moves them to 3 and 4 before exec.
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        cmd = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}",
               "--remote-debugging-pipe", "about:blank"]
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$@" 3<&{a} 4>&{b} {a}<&- {b}>&-', "bash", *cmd],
            pass_fds=(a, b), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        os.close(a)
        os.close(b)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        seen = [e for e in self.events if e.get("method") == method
                and e.get("sessionId") == session]
        while not seen:
            event = self._next(deadline)
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        return seen[0]

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium (see its log)")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError(f"Chromium closed the pipe (exit {self.proc.poll()})")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    @contextlib.contextmanager
    def tab(self, url: str, width: int | None = None, height: int = 900,
            media: str | None = None):
        """A new tab showing ``url`` (load event fired); yields its session id. ``width``: the
        viewport in CSS pixels at device scale 1, scrollbars hidden (default: the browser's
        own); ``media``: emulated CSS media type, e.g. "print"."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target,
                                                       "flatten": True})["sessionId"]
        try:
            for domain in ("Runtime", "Log", "Page"):
                self.send(f"{domain}.enable", session=session)
            if width is not None:
                self.send("Emulation.setDeviceMetricsOverride", {
                    "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                    session=session)
                # No scrollbar takes a strip off the page: its whole width is the window's.
                self.send("Emulation.setScrollbarsHidden", {"hidden": True}, session=session)
            if media is not None:
                self.send("Emulation.setEmulatedMedia", {"media": media}, session=session)
            nav = self.send("Page.navigate", {"url": url}, session=session)
            if nav.get("errorText"):
                raise AssertionError(f"navigation to {url} failed: {nav['errorText']}")
            self.wait_event("Page.loadEventFired", session)
            yield session
        finally:
            self.send("Target.closeTarget", {"targetId": target})

    def evaluate(self, session: str, expression: str):
        """The value of a JavaScript expression in the tab (a promise is awaited)."""
        reply = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                               "returnByValue": True}, session=session)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def check_page(self, url: str) -> PageCheck:
        """Open ``url`` in a new tab, wait for the load event and every image's decoding, and
        return the images' natural sizes and every error the page produced."""
        with self.tab(url) as session:
            images = self.evaluate(session, IMAGES_JS)
            title = self.evaluate(session, "document.title")
        return PageCheck(title, images, _page_errors(
            [e for e in self.events if e.get("sessionId") == session]))

    def layout(self, url: str, width: int = 1280, height: int = 900,
               media: str | None = None, expression: str = LAYOUT_JS) -> dict:
        """``expression`` (by default the page's widths and its in-page links) evaluated once the
        page is laid out in a ``width`` x ``height`` viewport and its images decoded."""
        with self.tab(url, width, height, media) as session:
            self.evaluate(session, IMAGES_JS)
            return self.evaluate(session, expression)

    def screenshot(self, url: str, width: int = 1280, height: int = 2000) -> bytes:
        """A PNG of the page laid out ``width`` CSS pixels wide: as wide as the document's
        content (so wider than ``width`` when something overflows), ``height`` pixels tall."""
        with self.tab(url, width, height) as session:
            self.evaluate(session, IMAGES_JS)
            size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"],
                    "height": min(size["height"], height), "scale": 1}
            shot = self.send("Page.captureScreenshot", {
                "format": "png", "clip": clip, "captureBeyondViewport": True}, session=session)
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            os.close(self._w)
            os.close(self._r)
            self._log.close()


def _page_errors(events: list[dict]) -> list[str]:
    errors = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console." + p["type"] + ": " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e.get("method") == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            text = d.get("exception", {}).get("description", d.get("text", ""))
            errors.append(f"exception: {text}")
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')}")
    return errors


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """One headless Chromium for the module, with a fresh profile; terminated afterwards."""
    exe = shutil.which("chromium") or CHROMIUM
    if not Path(exe).exists():
        pytest.fail("Chromium is not installed: run bash tests/install_system_deps.sh")
    folder = tmp_path_factory.mktemp("chromium")
    browser = HeadlessChromium(exe, folder / "profile", folder / "chromium.log")
    try:
        browser.send("Browser.getVersion")
        yield browser
    finally:
        browser.close()
