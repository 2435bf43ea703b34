"""Study definitions: ``studies/*.yaml`` validated into typed, frozen configs.

A bad file is reported with every problem at once (unknown keys, empty or inverted ranges, log
ranges touching zero, limits outside a setting's nature, unknown sampler / pruner / dataset, a
missing parent), before anything is created in a store.
"""

from __future__ import annotations

import codecs
import inspect
import math
import os
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from pipeline.config import ConfigError, Dataset, TrainConfig, format_problems, validation_problems
from pipeline.search.limits import Limit, limit_problems, pair_problems
from pipeline.search.params import BundleParam, CategoricalParam, FrozenModel, ParamSpec

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
# The report views a study file may name; pipeline.report.views.registry implements each (a test
# keeps the two equal): the report layer sits above this one, so the names live here.
REPORT_VIEWS = ("curves", "overfitting", "batch_size", "width_depth", "ablation", "train_size",
                "transfer")
SMOKE_TRIALS = 3  # a smoke run: this many tiny trials, to check a study file


class Objective(FrozenModel):
    metric: str = "val_acc"
    """A per-epoch validation metric; the trial's value is its best over training."""
    direction: Literal["maximize", "minimize"] = "maximize"


class SamplerConfig(FrozenModel):
    name: Literal["qmc", "random", "tpe", "gp", "grid"] = "tpe"
    seed: int = 0
    options: dict[str, Any] = {}
    """Extra keyword arguments for the Optuna sampler."""


class PrunerConfig(FrozenModel):
    name: Literal["none", "median", "successive_halving", "hyperband"] = "none"
    options: dict[str, Any] = {}
    """Extra keyword arguments for the Optuna pruner."""


class NarrowConfig(FrozenModel):
    """How a fine study narrows its parent's space."""

    top_k: int | None = Field(None, ge=1)
    """Use the parent's k best completed trials."""
    top_fraction: float | None = Field(None, gt=0, le=1)
    """Or this share of them (at least 2 trials)."""
    margin: float = Field(0.25, ge=0)
    """Padding on each side, as a share of the span (in log space for log parameters)."""
    boundary_fraction: float = Field(0.1, gt=0, lt=0.5)
    """A parameter whose best values lie within this share of a parent edge is flagged."""
    enqueue: int = Field(3, ge=0)
    """How many of the parent's best configurations seed the fine study."""


class RecheckConfig(FrozenModel):
    """Re-check a study's best trials over fresh seeds before naming a winner
    (pipeline.search.recheck)."""

    top_k: int = Field(5, ge=1)
    """Retrain the study's k best completed trials (by the objective; ties: earlier trial)."""
    seeds: int = Field(3, ge=2)
    """Each with this many fresh training seeds, the same seeds for every candidate (paired)."""
    resplit: bool = False
    """Also draw a new train/validation split per seed (data_seed = the seed); the test split
    never moves."""


class ReportConfig(FrozenModel):
    views: tuple[str, ...] = ()
    """Report views (REPORT_VIEWS; pipeline.report.views.registry) added after the standard
    report."""


class StudyConfig(FrozenModel):
    """One study file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    dataset: Dataset = "digits"
    objective: Objective = Objective()
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    n_trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)
    """Seconds after which no new trial starts."""
    fixed: dict[str, Any] = {}
    """TrainConfig settings shared by every trial."""
    space: dict[str, ParamSpec] = {}
    """Searched TrainConfig settings."""
    parent: str | None = None
    """A study (name under studies/) whose best trials narrow this study's space."""
    narrow: NarrowConfig = NarrowConfig()
    limits: dict[str, Limit] = {}
    """Hard limits a range derived from the parent never passes (pipeline.search.limits)."""
    source: str | None = None
    """A study (name under studies/) whose best trial is this study's transfer checkpoint:
    every trial takes its architecture and input size, and `transfer` linear_probe / fine_tune
    trials start from its weights (pipeline.search.transfer)."""
    report: ReportConfig = ReportConfig()
    """What the report adds for this study (see pipeline.report.views.registry)."""
    recheck: RecheckConfig | None = None
    """Re-check the best trials over fresh seeds after the search (off when absent)."""

    @field_validator("fixed")
    @classmethod
    def _fixed_keys(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return value

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        """The configuration of one trial: fixed settings, the study's dataset, then params
        (which include what a `source` study hands down: pipeline.search.transfer.inherited)."""
        settings = {}  # a bundle parameter contributes the settings of its chosen bundle
        for name, value in params.items():
            spec = self.space.get(name)
            settings |= spec.choices[value] if isinstance(spec, BundleParam) else {name: value}
        return TrainConfig(**{**self.fixed, "dataset": self.dataset, **settings})


def _semantic_problems(cfg: StudyConfig, studies_dir: Path) -> list[str]:
    """Problems pydantic cannot see: ranges, names, and rules between settings."""
    problems = []
    for name, spec in cfg.space.items():
        if isinstance(spec, BundleParam):
            problems += _bundle_problems(cfg, name, spec)
        elif name not in TrainConfig.model_fields:
            problems.append(f"space.{name}: not a training setting")
        problems += [f"space.{name}: {p}" for p in spec.problems()]
        if name in cfg.fixed:
            problems.append(f"space.{name}: also given in fixed; keep one")
    problems += pair_problems(cfg.space, cfg.fixed)
    problems += limit_problems(cfg.limits, cfg.space, cfg.fixed, cfg.parent is not None)
    if cfg.sampler.name == "grid":
        problems += [f"space.{n}: the grid sampler needs categorical parameters"
                     for n, s in cfg.space.items()
                     if not isinstance(s, (CategoricalParam, BundleParam))]
        points = math.prod(len(s.choices) for s in cfg.space.values()
                           if isinstance(s, (CategoricalParam, BundleParam)))
        if cfg.n_trials > points:  # Optuna would run repeated points
            problems.append(f"n_trials: {cfg.n_trials} is more than the grid's {points} "
                            f"points; set n_trials: {points}")
    problems += _view_problems(cfg.report.views)
    problems += _options_problems("sampler", cfg.sampler.name, cfg.sampler.options)
    problems += _options_problems("pruner", cfg.pruner.name, cfg.pruner.options)
    if cfg.narrow.top_k and cfg.narrow.top_fraction:
        problems.append("narrow: give top_k or top_fraction, not both")
    if cfg.parent is not None:
        if cfg.parent == cfg.name:
            problems.append("parent: a study cannot be its own parent")
        elif not (studies_dir / f"{cfg.parent}.yaml").is_file():
            problems.append(f"parent: no study file {studies_dir / (cfg.parent + '.yaml')}")
    problems += _source_problems(cfg, studies_dir)
    # Check the fixed settings as a whole with a representative point of the space.
    probe = {n: _probe_value(s) for n, s in cfg.space.items()
             if n in TrainConfig.model_fields or isinstance(s, BundleParam)}
    if cfg.source:  # the engine supplies the checkpoint at run time
        probe["pretrained"] = "source-checkpoint.pt" if _transfers(cfg, probe) else None
    try:
        cfg.train_config(probe)
    except ValidationError as err:
        problems += [f"fixed.{p}" for p in validation_problems(err)
                     if not any(p.startswith(f"{n}:") for n in cfg.space)]
    return problems


def _transfers(cfg: StudyConfig, params: dict) -> bool:
    """Whether a trial with these params starts from the source's weights."""
    return {**cfg.fixed, **params}.get("transfer") in ("linear_probe", "fine_tune")


def _source_problems(cfg: StudyConfig, studies_dir: Path) -> list[str]:
    """A transfer study names its source; the source decides the network and its input."""
    from pipeline.search.transfer import INHERITED

    modes = set(cfg.space["transfer"].choices) if isinstance(cfg.space.get("transfer"),
                                                              CategoricalParam) else set()
    modes |= {cfg.fixed["transfer"]} if "transfer" in cfg.fixed else set()
    if cfg.source is None:
        needing = sorted(str(m) for m in modes & {"linear_probe", "fine_tune"})
        return [f"transfer: {', '.join(needing)} start from a checkpoint: name the study that "
                "trains it as `source`"] if needing else []
    problems = []
    if cfg.source == cfg.name:
        problems.append("source: a study cannot be its own source")
    elif not (studies_dir / f"{cfg.source}.yaml").is_file():
        problems.append(f"source: no study file {studies_dir / (cfg.source + '.yaml')}")
    if not modes:
        problems.append("source: set `transfer` (scratch, linear_probe, fine_tune) in space or "
                        "fixed, to say how trials use the source")
    for where, names in (("fixed", cfg.fixed), ("space", cfg.space)):
        problems += [f"{where}.{n}: taken from the source study's best trial; remove it"
                     for n in names if n in (*INHERITED, "pretrained", "freeze")]
    return problems


def _probe_value(spec):
    if isinstance(spec, (CategoricalParam, BundleParam)):
        return next(iter(spec.choices))
    return spec.low


def _bundle_problems(cfg: StudyConfig, name: str, spec: BundleParam) -> list[str]:
    """Each bundle must be a valid configuration with the fixed settings, and must not set what
    fixed or another parameter already sets (one place per fact)."""
    problems = []
    others = {n for n in cfg.space if n != name}
    for choice, settings in spec.choices.items():
        for key in sorted(set(settings) & (set(cfg.fixed) | others)):
            problems.append(f"space.{name}.{choice}: sets {key}, also given in "
                            f"{'fixed' if key in cfg.fixed else 'space'}; keep one")
        known = {k: v for k, v in settings.items() if k in TrainConfig.model_fields}
        try:
            TrainConfig(**{**cfg.fixed, "dataset": cfg.dataset, **known})
        except ValidationError as err:
            problems += [f"space.{name}.{choice}: {p}" for p in validation_problems(err)
                         if p.split(":")[0] in known]
    return problems


def _view_problems(views) -> list[str]:
    return [f"report.views: unknown view {v!r} (known: {', '.join(REPORT_VIEWS)})" for v in views
            if v not in REPORT_VIEWS]


def _options_problems(kind: str, name: str, options: dict) -> list[str]:
    from pipeline.search.samplers import PRUNERS, SAMPLERS

    factory = (SAMPLERS if kind == "sampler" else PRUNERS).get(name)
    if factory is None or not options:
        return []
    accepted = set(inspect.signature(factory).parameters)
    return [f"{kind}.options.{k}: not an option of the {name} {kind} (accepted: "
            f"{sorted(accepted - {'self', 'search_space', 'seed'})})" for k in options
            if k not in accepted]


def smoke_config(cfg: StudyConfig) -> StudyConfig:
    """A tiny budget: one short cycle (or two epochs), a small subset for the big datasets."""
    fixed = {**cfg.fixed, "cycles": 1, "step_size_epochs": 1,
             "epochs": min(cfg.fixed.get("epochs", 2), 2)}
    searched = cfg.space.get("n_per_class")
    if searched is None and (cfg.dataset != "digits" or cfg.fixed.get("n_per_class")):
        # a subset every dataset has (a digits class has about 115 training examples)
        fixed["n_per_class"] = min(cfg.fixed.get("n_per_class") or 50, 50)
    space = {n: s for n, s in cfg.space.items() if n not in fixed}
    n_trials = min(cfg.n_trials, SMOKE_TRIALS)
    if isinstance(searched, CategoricalParam):
        # A training-size study stays one, on subsets every dataset has (a digits class has
        # about 115 training examples).
        capped = dict.fromkeys(min(c or 50, 50) for c in searched.choices)
        space["n_per_class"] = searched.model_copy(update={"choices": tuple(capped)})
    if cfg.sampler.name == "grid":  # more trials than points would repeat points
        n_trials = min(n_trials, math.prod(len(s.choices) for s in space.values()))
    recheck = cfg.recheck and cfg.recheck.model_copy(
        update={"top_k": min(cfg.recheck.top_k, 2), "seeds": 2})
    return cfg.model_copy(update={"fixed": fixed, "space": space, "n_trials": n_trials,
                                  "timeout": None, "recheck": recheck})


def resolve_study_path(study: str, studies_dir: Path = STUDIES_DIR) -> Path:
    """A study by name (``studies/NAME.yaml``) or by path."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        return path
    return studies_dir / f"{study}.yaml"


def load_study(study: str, studies_dir: Path | None = None) -> StudyConfig:
    """Load and validate a study file, raising one ConfigError that lists every problem."""
    path = resolve_study_path(study, studies_dir or STUDIES_DIR)
    studies_dir = studies_dir or (path.parent if _is_dir(path.parent) else STUDIES_DIR)
    where = f"study file {path}"
    raw = _parse_yaml(_read_text(path, where, studies_dir), where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (name, dataset, space, ...)")
    raw = {k if isinstance(k, str) else str(k): v for k, v in raw.items()}  # `1:` is a key too
    try:
        cfg, problems = StudyConfig(**raw), []
    except ValidationError as err:
        cfg, problems = _without_invalid_entries(raw, err), validation_problems(err)
    if cfg is not None:
        problems += _semantic_problems(cfg, studies_dir)
    if problems:
        raise ConfigError(format_problems(where, problems))
    return cfg


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL character
        return False


def _read_text(path: Path, where: str, studies_dir: Path) -> str:
    """The file's text, or a ConfigError naming the file, what is wrong and the fix: every way
    reading it can fail (missing, a folder, a broken link, no permission, not a regular file,
    an I/O error, bytes that are not UTF-8 text)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes() if stat.S_ISREG(mode) else b""
    except (FileNotFoundError, NotADirectoryError, ValueError):
        if path.is_symlink():
            raise ConfigError(f"{where}: is a symbolic link to {os.readlink(path)}, which does "
                              "not exist; point it at a study file, or give the file") from None
        available = sorted(p.stem for p in studies_dir.glob("*.yaml") if p.is_file())
        raise ConfigError(f"{where}: not found. Available studies: "
                          f"{', '.join(available) or 'none'}") from None
    except PermissionError:
        raise ConfigError(f"{where}: cannot be read: permission denied; give yourself read "
                          f"permission (chmod u+r {path}), or copy the file") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot be read: {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{where}: is a folder, not a study file; give a YAML file "
                          "(studies/NAME.yaml, or a name under studies/)")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{where}: is not a regular file (a device, pipe or socket); give a "
                          "YAML study file")
    head = data[:2048]  # UTF-16: a byte-order mark, or ASCII text with a NUL every other byte
    nuls = sorted(head[i::2].count(0) / max(len(head[i::2]), 1) for i in (0, 1))
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (
            nuls[0] == 0 and nuls[1] > 0.9 and len(head) > 8):
        raise ConfigError(f"{where}: is UTF-16 text; save it as UTF-8")
    if b"\0" in data:
        raise ConfigError(f"{where}: is binary, not text; is it the right file?")
    data = data.removeprefix(codecs.BOM_UTF8)  # as some editors save UTF-8: harmless
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        if err.reason == "unexpected end of data":
            raise ConfigError(f"{where}: ends in the middle of a character (line {line}): was it "
                              "cut short (an interrupted download or copy)?") from None
        raise ConfigError(f"{where}: is not UTF-8 text (byte 0x{data[err.start]:02x} at line "
                          f"{line}, column {column}); save it as UTF-8") from None


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as err:  # a control character
        line = text.count("\n", 0, err.position) + 1
        column = err.position - text.rfind("\n", 0, err.position)
        raise ConfigError(f"{where}: contains the control character #x{err.character:02x} at "
                          f"line {line}, column {column}, which YAML does not allow; remove it"
                          ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read as YAML") from None


def _without_invalid_entries(raw: dict, err: ValidationError) -> StudyConfig | None:
    """The file less its invalid top-level entries, so that the checks pydantic cannot make
    still run and every problem is reported at once."""
    bad = {e["loc"][0] for e in err.errors() if e["loc"]}
    try:
        return StudyConfig(**{"name": "study", **{k: v for k, v in raw.items() if k not in bad}})
    except ValidationError:
        return None

