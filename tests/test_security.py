"""Nothing the pipeline loads can run code: checkpoints are loaded weights-only, model files come
only from trial runs the pipeline wrote, dataset pickles only when their checksums match, and the
dependency floors sit above the known remote-code / path-traversal CVEs.

The malicious files here are real: each is a pickle whose ``__reduce__`` creates a marker file
when unpickled, and a control load (``weights_only=False``, what an unsafe loader does) shows
that the payload does fire, so its absence after the pipeline's load is the refusal, not a dud.
"""

from __future__ import annotations

import json
import pickle
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from search_fixtures import (
    REPO,
    fresh_store,
    load,
    one_torch_thread,
    run_search,
    study_runs,
    write_study,
)

from pipeline.config import TrainConfig
from pipeline.training.checkpoint import UnsafeCheckpoint, load_state_dict
from pipeline.training.data import DatasetNotFound
from pipeline.training.trainer import train

assert one_torch_thread  # an autouse fixture, imported to apply to this module


class Payload:
    """Unpickling this calls open(marker, "w"): code chosen by whoever wrote the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A state-dict-shaped checkpoint with the payload inside, in torch's zip format (what
    torch.save writes) or as a bare pickle (the legacy format torch.load also reads)."""
    state = {"fc1.weight": torch.zeros(2, 2), "evil": Payload(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(state, protocol=2))  # torch's own legacy protocol
    else:
        torch.save(state, path)
    return path


def assert_payload_is_live(path: Path, marker: Path, legacy: bool = False) -> None:
    """The control: an unsafe load of the same file does run the payload."""
    assert not marker.exists()
    if legacy:
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


# -- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_malicious_pretrained_checkpoint_is_refused_before_it_runs(tmp_path, digits, legacy):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker, legacy)
    cfg = TrainConfig(schedule="constant", epochs=1, width=8, pretrained=str(evil),
                      freeze="features")
    with pytest.raises(UnsafeCheckpoint, match=r"refusing to load .*evil\.pt.*more than tensors"):
        train(cfg, digits)
    assert not marker.exists()
    assert_payload_is_live(evil, marker, legacy)


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)  # loads weights-only, but is not name -> tensor
    with pytest.raises(UnsafeCheckpoint, match="not a state dict"):
        load_state_dict(path)


def test_a_search_whose_checkpoint_is_malicious_fails_its_trials_and_runs_nothing(
        tmp_path, empty_mlflow_db):
    client = fresh_store(tmp_path, empty_mlflow_db)
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    body = {"name": "evil", "n_trials": 1, "sampler": {"name": "random", "seed": 0},
            "fixed": {"schedule": "constant", "epochs": 1, "pretrained": str(evil),
                      "freeze": "features"},
            "space": {"width": {"type": "int", "low": 8, "high": 16}}}
    result = run_search(tmp_path, "--study", str(write_study(tmp_path, "evil", json.dumps(body))))
    assert result.code == 1  # every trial failed: a failed execution
    assert not marker.exists()
    trials = load(tmp_path, "evil").trials
    assert trials and all("refusing to load" in t.user_attrs["error"] for t in trials)
    for t in trials:
        text = Path(client.download_artifacts(t.user_attrs["mlflow_run_id"], "error.txt",
                                              str(tmp_path))).read_text()
        assert "UnsafeCheckpoint" in text
    assert_payload_is_live(evil, marker)


# -- models loaded back from MLflow ---------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, empty_mlflow_db):
    """A one-trial study run to the end; returns (folder, client, study file)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    client = fresh_store(tmp_path, empty_mlflow_db)
    body = {"name": "safe", "n_trials": 1, "sampler": {"name": "random", "seed": 0},
            "fixed": {"schedule": "constant", "epochs": 1},
            "space": {"width": {"type": "int", "low": 8, "high": 16}}}
    path = write_study(tmp_path, "safe", json.dumps(body))
    assert run_search(tmp_path, "--study", str(path)).code == 0
    return tmp_path, client, path


def test_a_tampered_trial_checkpoint_is_not_loaded_into_the_best_model(finished_study):
    """Someone with write access to the artifact store swaps the best trial's weights for a
    malicious pickle; the next execution's summary loads the best trial's weights again."""
    folder, client, path = finished_study
    (trial,) = load(folder, "safe").trials
    uri = client.get_run(trial.user_attrs["mlflow_run_id"]).info.artifact_uri
    stored = Path(urlparse(uri).path) / "model" / "state_dict.pt"
    # what the pipeline wrote passes its own weights-only rule
    weights = load_state_dict(stored)
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    marker = folder / "pwned"
    malicious_checkpoint(stored, marker)

    result = run_search(folder, "--study", str(path))  # budget spent: summary only
    assert result.code == 0, result.err
    assert "best model not logged" in result.err and "refusing to load" in result.err
    assert not marker.exists()
    latest = max(study_runs(client, "safe"), key=lambda r: r.info.start_time)
    assert latest.info.status == "FINISHED"
    assert "pipeline.best_model_uri" not in latest.data.tags
    assert_payload_is_live(stored, marker)


def test_only_the_pipelines_own_trial_runs_count_as_model_sources(finished_study):
    from pipeline.search.study_run import is_trial_run

    folder, client, _ = finished_study
    (trial,) = load(folder, "safe").trials
    own = trial.user_attrs["mlflow_run_id"]
    assert is_trial_run(client, own, "safe", trial.number)
    assert not is_trial_run(client, own, "other-study", trial.number)
    assert not is_trial_run(client, own, "safe", trial.number + 1)
    # a run that copies a trial's tags but hangs under no study run of ours
    tags = client.get_run(own).data.tags
    forged = client.create_run("0", tags={k: v for k, v in tags.items()
                                          if k.startswith("pipeline.")}).info.run_id
    assert not is_trial_run(client, forged, "safe", trial.number)
    assert not is_trial_run(client, "0" * 32, "safe", trial.number)  # not in this store


# -- dataset pickles ------------------------------------------------------------------------------


def test_a_malicious_cifar_batch_is_refused_by_its_checksum(tmp_path, monkeypatch,
                                                            fresh_splits_cache):
    """torchvision unpickles CIFAR-10's batches only when each file's MD5 matches the list it
    ships (here pointed at the files the test writes), so a swapped-in pickle never loads."""
    from test_data import write_cifar

    write_cifar(tmp_path, monkeypatch)
    batch = next(tmp_path.rglob("data_batch_1"))
    marker = tmp_path / "pwned"
    batch.write_bytes(pickle.dumps({"data": Payload(marker), "labels": []}, protocol=2))
    with pytest.raises(DatasetNotFound):
        fresh_splits_cache("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()
    pickle.loads(batch.read_bytes())  # the control: plain unpickling fires the payload
    assert marker.exists()


# -- dependency floors ----------------------------------------------------------------------------

# (CVE, what it allowed, first fixed release): the floors in pyproject.toml must clear each one.
CVES = {
    "torch": [("CVE-2025-32434", "torch.load(weights_only=True) ran code", "2.6.0"),
              ("CVE-2026-24747", "weights-only unpickler memory corruption", "2.10.0")],
    "mlflow": [("CVE-2023-1177", "tracking server path traversal", "2.2.1"),
               ("CVE-2023-6831", "path traversal", "2.9.2"),
               ("CVE-2024-1483", "artifact_location path traversal", "2.10.0"),
               ("CVE-2025-11201", "model-creation directory traversal RCE", "3.0.0"),
               ("CVE-2026-2033", "artifact handler directory traversal RCE", "3.8.0")],
}


@pytest.mark.parametrize("package", sorted(CVES))
def test_dependency_floors_exclude_the_known_cves(package):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == package]
    (floor,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
    for cve, _what, fixed in CVES[package]:
        assert floor >= Version(fixed), f"{package}>={floor} admits {cve}"
        assert cve in (REPO / "pyproject.toml").read_text()  # named where the floor is set
    installed = Version(__import__(package).__version__.split("+")[0])
    assert installed >= floor
    # the floors only: an upper bound would admit the torch 2.13.0+cpu trap's neighbours or
    # hold back security releases
    assert all(s.operator == ">=" for s in req.specifier)


# -- documentation --------------------------------------------------------------------------------


def test_readme_keeps_mlflow_on_loopback_and_guards_the_shared_server():
    """Every `mlflow ui` / `mlflow server` the README and docs/ show binds to 127.0.0.1, and the
    one other machines reach (through a tunnel or proxy; docs/scaling-out.md) checks passwords
    and Host headers, with exactly the options the scale-out tests start it with
    (tests/services.py)."""
    import re

    from services import SERVER_OPTIONS
    from test_project import bash_blocks, commands, project_docs, section

    docs = project_docs()
    shown = [c for block in bash_blocks(docs) for c in commands(block)
             if re.search(r"\bmlflow (ui|server)\b", c)]
    assert len(shown) >= 2
    assert all(re.search(r"--host 127\.0\.0\.1\b", c) for c in shown), shown
    scaling_out = section(docs, "Scaling out")
    (server,) = [c for block in bash_blocks(scaling_out) for c in commands(block)
                 if "mlflow server" in c]
    assert "--app-name basic-auth" in server and "--allowed-hosts" in server
    assert re.findall(r"(--[a-z-]+)", server) == list(SERVER_OPTIONS)
