"""Multi-fidelity: a coarse study explores short and small (fewer epochs, a class-balanced subset of
the training split), the study narrowed from it trains long and full, and the narrowing record
says how each ran."""

from __future__ import annotations

import json

import pytest
from search_fixtures import (
    all_runs,
    fresh_store,
    load,
    one_torch_thread,
    run_report,
    run_search,
    write_study,
)

from pipeline.config import describe_fidelity, epoch_range, fidelity

assert one_torch_thread  # an autouse fixture, imported to apply to this module


@pytest.mark.parametrize("fixed, bounds, expected", [
    ({"schedule": "constant", "epochs": 3}, {}, (3, 3)),
    ({"schedule": "cyclical", "step_size_epochs": 2}, {"cycles": (1, 4)}, (4, 16)),
    ({"schedule": "cyclical", "step_size_epochs": 1, "cycles": 5}, {"width": (8, 64)}, (10, 10)),
    ({"schedule": "constant"}, {"epochs": (2, 6)}, (2, 6)),
])
def test_epoch_range(fixed, bounds, expected):
    assert epoch_range(fixed, bounds) == expected


def test_fidelity_and_its_words():
    low = fidelity({"n_per_class": 100, "schedule": "cyclical", "step_size_epochs": 1},
                   {"cycles": (1, 3)})
    assert low == {"n_per_class": 100, "epochs": [2, 6]}
    assert describe_fidelity(low) == "100 examples per class, 2 to 6 epochs"
    full = fidelity({"schedule": "constant", "epochs": 8}, {})
    assert describe_fidelity(full) == "the whole training split, 8 epochs"


def test_a_low_fidelity_parent_narrows_a_full_fidelity_child(tmp_path, empty_mlflow_db):
    """coarse: 20 images per class, 2 epochs; fine: the whole training split, 4 epochs. The fine
    study's record and console say so, and its trials really train on the whole split."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    space = {"width": {"type": "int", "low": 8, "high": 64, "log": True}}
    base = {"sampler": {"name": "random", "seed": 0}, "dataset": "digits"}
    write_study(tmp_path, "small", json.dumps({
        **base, "name": "small", "n_trials": 4, "space": space,
        "fixed": {"schedule": "constant", "epochs": 2, "batch_size": 32, "n_per_class": 20}}))
    write_study(tmp_path, "full", json.dumps({
        **base, "name": "full", "n_trials": 2, "parent": "small",
        "narrow": {"top_k": 2, "margin": 0.1, "enqueue": 1},
        "fixed": {"schedule": "constant", "epochs": 4, "batch_size": 32}}))
    assert run_search(tmp_path, "--study", str(tmp_path / "small.yaml")).code == 0
    result = run_search(tmp_path, "--study", str(tmp_path / "full.yaml"))
    assert result.code == 0, result.err

    record = load(tmp_path, "full").user_attrs["narrowing"]["fidelity"]
    assert record == {"parent": {"n_per_class": 20, "epochs": 2},
                      "this": {"n_per_class": "all", "epochs": 4}}
    assert ("small trained on 20 examples per class, 2 epochs; this study trains on the whole "
            "training split, 4 epochs") in result.out
    sizes = {}
    for run in all_runs(client):
        if run.data.tags.get("pipeline.kind") != "trial":
            continue
        (train,) = [i.dataset for i in run.inputs.dataset_inputs
                    if i.dataset.name == "digits-train"]
        sizes.setdefault(run.data.tags["pipeline.study"], set()).add(
            (json.loads(train.profile)["num_rows"], run.data.params["epochs"]))
    assert sizes["small"] == {(200, "2")}  # 20 per class, 10 classes
    (full,) = sizes["full"]
    assert full[0] > 1000 and full[1] == "4"  # digits' whole training split (1,437 images)

    report = run_report(tmp_path, "--study", "full", "--no-log")
    assert report.code == 0, report.err
    assert ("Narrowed from small, which trained on 20 examples per class, 2 epochs; this study "
            "trains on the whole training split, 4 epochs.") in (
        tmp_path / "reports" / "full" / "report.md").read_text()
