"""Study files: every shipped one loads; a bad one is refused with every problem listed at once,
by load_study and by the CLI (exit code 2), before anything is created in a store."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial
from pydantic import ValidationError
from search_fixtures import (
    STUDIES,
    all_runs,
    fresh_store,
    journal,
    run_search,
    study_names,
    write_study,
)

from pipeline.config import ConfigError, TrainConfig
from pipeline.search.params import BundleParam, CategoricalParam, FloatParam, IntParam
from pipeline.search.studyfile import StudyConfig, load_study

SHIPPED = sorted(STUDIES.glob("*.yaml"))
AVAILABLE = "Available studies: " + ", ".join(p.stem for p in SHIPPED)

GOOD_SPACE = """\
space:
  l2_lambda: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
  width: {type: int, low: 16, high: 64}
"""


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_study_file_loads(path):
    cfg = load_study(path.stem)
    assert cfg == load_study(str(path))  # by name or by path: the same study
    assert cfg.name == path.stem  # a parent is named by its file; its Optuna study by `name`
    assert cfg.space or cfg.parent or cfg.n_trials == 1  # something to search, or one run
    for name, spec in cfg.space.items():
        if isinstance(spec, BundleParam):  # a name for several settings
            assert all(set(b) <= set(TrainConfig.model_fields) for b in spec.choices.values())
        else:
            assert name in TrainConfig.model_fields
        assert name not in cfg.fixed
    cfg.train_config({n: next(iter(s.choices)) if isinstance(s, (CategoricalParam, BundleParam))
                      else s.low for n, s in cfg.space.items()})
    if cfg.parent:
        assert load_study(cfg.parent).name == cfg.parent


def test_shipped_studies_are_a_coarse_to_fine_chain():
    coarse, fine = load_study("coarse"), load_study("fine")
    assert fine.parent == "coarse"
    assert coarse.sampler.name == "qmc" and fine.sampler.name == "tpe"
    for name in ("l2_lambda", "eta_min", "eta_max"):  # scale-like: searched in log space
        assert coarse.space[name].log


def test_study_config_is_frozen_and_typed():
    cfg = load_study("coarse")
    assert isinstance(cfg.space["l2_lambda"], FloatParam)
    assert isinstance(cfg.space["depth"], IntParam)
    with pytest.raises(ValidationError):  # frozen
        cfg.n_trials = 3


# -- load_study: one problem at a time ------------------------------------------------------------


@pytest.mark.parametrize("body, expected", [
    ("name: s\nbogus: 1\n" + GOOD_SPACE, "bogus: unknown key"),
    ("name: s\nsampler: {name: annealing}\n" + GOOD_SPACE, "sampler.name"),
    ("name: s\npruner: {name: patient}\n" + GOOD_SPACE, "pruner.name"),
    ("name: s\ndataset: imagenet\n" + GOOD_SPACE, "dataset"),
    ("name: s\nspace:\n  width: {type: int, low: 64, high: 16}\n",
     "space.width: low (64) must be below high (16)"),
    ("name: s\nspace:\n  l2_lambda: {type: float, low: 0.1, high: 0.1}\n",
     "space.l2_lambda: low (0.1) must be below high (0.1)"),
    ("name: s\nspace:\n  l2_lambda: {type: float, low: 0.0, high: 0.1, log: true}\n",
     "space.l2_lambda: log scale needs low > 0"),
    ("name: s\nspace:\n  l2_lambda: {type: float, low: -1.0, high: 0.1, log: true}\n",
     "space.l2_lambda: log scale needs low > 0"),
    ("name: s\nspace:\n  width: {type: int, low: 0, high: 64, log: true}\n",
     "space.width: log scale needs low > 0"),
    ("name: s\nspace:\n  widht: {type: int, low: 16, high: 64}\n",
     "space.widht: not a training setting"),
    ("name: s\nfixed: {widht: 3}\n" + GOOD_SPACE, "unknown training settings ['widht']"),
    ("name: s\nfixed: {width: 32}\n" + GOOD_SPACE, "space.width: also given in fixed"),
    ("name: s\nparent: nosuch\n" + GOOD_SPACE, "parent: no study file"),
    ("name: s\nparent: s\n" + GOOD_SPACE, "parent: a study cannot be its own parent"),
    ("name: s\nsampler: {name: tpe, options: {n_startup: 3}}\n" + GOOD_SPACE,
     "sampler.options.n_startup: not an option"),
    ("name: s\nsampler: {name: grid}\n" + GOOD_SPACE,
     "space.width: the grid sampler needs categorical parameters"),
    ("name: s\nnarrow: {top_k: 3, top_fraction: 0.2}\n" + GOOD_SPACE, "not both"),
    ("name: s\nspace:\n  activation: {type: categorical, choices: [relu, relu]}\n",
     "duplicate choices"),
])
def test_a_bad_study_file_names_its_problem(tmp_path, body, expected):
    path = write_study(tmp_path, "s", body)
    with pytest.raises(ConfigError) as err:
        load_study(str(path))
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_a_missing_study_names_the_available_ones():
    with pytest.raises(ConfigError, match=f"not found. {AVAILABLE}"):
        load_study("nosuch")


@pytest.mark.parametrize("text", ["name: [unclosed", "- a list\n- of things\n"])
def test_not_a_mapping_or_not_yaml_is_a_config_error(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_study(str(path))


# -- the eta_min / eta_max pair must never cross --------------------------------------------------


def pair_study(tmp_path, eta_min: str, eta_max: str) -> str:
    return str(write_study(tmp_path, "pair", f"name: pair\nspace:\n  eta_min: {eta_min}\n"
                                             f"  eta_max: {eta_max}\n"))


def test_eta_ranges_that_can_cross_are_refused(tmp_path):
    path = pair_study(tmp_path, "{type: float, low: 1.0e-4, high: 1.0e-1, log: true}",
                      "{type: float, low: 1.0e-2, high: 1.0, log: true}")
    with pytest.raises(ConfigError, match="eta_min's high <= eta_max's low"):
        load_study(path)


def test_eta_ranges_that_touch_are_accepted(tmp_path):
    path = pair_study(tmp_path, "{type: float, low: 1.0e-6, high: 1.0e-3, log: true}",
                      "{type: float, low: 1.0e-3, high: 1.0, log: true}")
    assert load_study(path).space["eta_min"].high == load_study(path).space["eta_max"].low


def test_a_fixed_eta_max_below_the_eta_min_range_is_refused(tmp_path):
    path = write_study(tmp_path, "pair", """\
        name: pair
        fixed: {eta_max: 0.001}
        space:
          eta_min: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
        """)
    with pytest.raises(ConfigError, match="eta_min .up to 0.01. can exceed eta_max .from 0.001"):
        load_study(str(path))


def test_shipped_coarse_space_never_crosses_eta():
    cfg = load_study("coarse")
    assert cfg.space["eta_min"].high <= cfg.space["eta_max"].low


def test_study_config_by_itself_accepts_a_crossing_pair_and_load_study_refuses_it(tmp_path):
    """The pair rule lives in load_study's checks (it spans two entries): documented here so a
    caller building StudyConfig directly knows to go through load_study."""
    body = {"name": "pair", "space": {
        "eta_min": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "eta_max": {"type": "float", "low": 1e-2, "high": 1.0, "log": True}}}
    StudyConfig(**body)
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError):
        load_study(str(tmp_path / "pair.yaml"))


# -- the CLI: exit code 2, every problem listed, nothing created ----------------------------------

EVERY_PROBLEM = """\
name: bad
parent: nosuch
bogus: 1
dataset: imagenet
sampler: {name: annealing}
pruner: {name: patient}
space:
  l2_lambda: {type: float, low: 0.0, high: 1.0e-1, log: true}
  width: {type: int, low: 64, high: 16}
"""


def assert_nothing_created(folder, before=("bad.yaml",)):
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """cwd and MLflow store in tmp_path; the store file does not exist yet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.mark.parametrize("body, problems", [
    (EVERY_PROBLEM.replace("bogus: 1\n", "").replace("dataset: imagenet\n", "")
     .replace("sampler: {name: annealing}\n", "").replace("pruner: {name: patient}\n", ""),
     ["log scale needs low > 0", "low (64) must be below high (16)", "parent: no study file"]),
    (EVERY_PROBLEM.replace("parent: nosuch\n", "").split("space:")[0] + GOOD_SPACE,
     ["bogus", "dataset", "sampler.name", "pruner.name"]),
])
def test_cli_lists_every_problem_of_one_kind_and_exits_2(in_tmp, body, problems):
    write_study(in_tmp, "bad", body)
    result = run_search(in_tmp, "--study", str(in_tmp / "bad.yaml"))
    assert result.code == 2
    assert f"{len(problems)} problem(s)" in result.err
    for problem in problems:
        assert problem in result.err
    assert_nothing_created(in_tmp)


def test_cli_lists_every_problem_at_once_and_creates_nothing(in_tmp):
    """The issue's list in one file: unknown key, low >= high, log range with low <= 0, unknown
    sampler, pruner and dataset, a parent that does not exist. All must be reported by one run
    (study.py's docstring promises "every problem at once")."""
    write_study(in_tmp, "bad", EVERY_PROBLEM)
    result = run_search(in_tmp, "--study", str(in_tmp / "bad.yaml"))
    assert result.code == 2
    for problem in ("bogus: unknown key", "dataset", "sampler.name", "pruner.name",
                    "space.l2_lambda: log scale needs low > 0",
                    "space.width: low (64) must be below high (16)", "parent: no study file"):
        assert problem in result.err, f"{problem!r} not reported in:\n{result.err}"
    assert_nothing_created(in_tmp)


@pytest.mark.parametrize("flags, message", [
    (["--study", "coarse", "--n-trials", "0"], "--n-trials must be at least 1"),
    (["--study", "coarse", "--workers", "0"], "--workers: expected a whole number >= 1"),
    (["--study", "coarse", "--workers", "many"], "--workers: expected a whole number"),
    (["--study", "coarse", "--dataset", "imagenet"], "--dataset 'imagenet' is not one of"),
    (["--study", "coarse", "--storage", "studies.txt"], "storage 'studies.txt' is not understood"),
    (["--study", "nosuch"], AVAILABLE),
])
def test_cli_bad_flags_exit_2_and_create_nothing(in_tmp, flags, message):
    result = run_search(in_tmp, *flags)
    assert result.code == 2
    assert message in result.err
    assert_nothing_created(in_tmp, before=())


def test_fine_study_before_its_parent_ran_exits_2_and_creates_nothing(in_tmp):
    """No parent study yet (a fresh folder): the message says to run the parent first, and no
    Optuna storage file or MLflow store is left behind."""
    result = run_search(in_tmp, "--study", "fine")
    assert result.code == 2
    assert "parent study 'coarse' has no completed trial" in result.err
    assert "Run it first: python -m pipeline.search --study coarse" in result.err
    assert study_names(in_tmp) == []
    assert_nothing_created(in_tmp, before=())


def test_fine_study_whose_parent_has_no_completed_trial_creates_no_study_and_no_run(
        tmp_path, monkeypatch, empty_mlflow_db):
    """The parent exists in the storage but every trial of it failed: exit 2, and the fine study
    is not created in the storage, nor any MLflow run."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    parent = optuna.create_study(study_name="coarse", storage=journal(tmp_path),
                                 direction="maximize")
    parent.add_trial(create_trial(state=TrialState.FAIL))
    result = run_search(tmp_path, "--study", "fine")
    assert result.code == 2
    assert "parent study 'coarse' has no completed trial" in result.err
    assert study_names(tmp_path) == ["coarse"]
    assert all_runs(client) == []


def test_a_study_made_for_another_dataset_is_refused(tmp_path, empty_mlflow_db):
    """Resuming `coarse` with a study of that name made for another dataset: exit 2, nothing
    added to it."""
    client = fresh_store(tmp_path, empty_mlflow_db)
    study = optuna.create_study(study_name="coarse", storage=journal(tmp_path))
    study.set_user_attr("space", {})
    study.set_user_attr("dataset", "mnist")
    result = run_search(tmp_path, "--study", "coarse", "--n-trials", "1")
    assert result.code == 2
    assert "was made for dataset 'mnist', not 'digits'" in result.err
    assert study.get_trials() == [] and all_runs(client) == []
