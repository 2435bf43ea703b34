"""Typed, frozen training configuration: the one place every training setting is named.

A trial's configuration is ``TrainConfig(**{**study.fixed, **sampled_params})``; the single-run CLI
builds its flags from these fields, so flag names mirror parameter names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")
"""Every dataset by name; ``digits`` ships inside scikit-learn and needs no download."""
Dataset = Literal[DATASETS]


def planned_epochs(schedule: str, epochs: float, step_size_epochs: float, cycles: float) -> float:
    """Passes over the training split a run makes: ``epochs`` for a constant rate; for a
    cyclical one, ``cycles`` cycles of two half-cycles of ``step_size_epochs`` each."""
    return epochs if schedule == "constant" else 2 * step_size_epochs * cycles


def epoch_range(fixed: dict, bounds: dict) -> tuple[float, float]:
    """The fewest and the most passes over the training split a trial of a study can make:
    from its fixed settings, the ``bounds`` (name -> (low, high)) of what it searches, and the
    defaults for the rest."""
    def low_high(name):
        if name in bounds:
            return bounds[name]
        value = fixed.get(name, TrainConfig.model_fields[name].default)
        return value, value

    schedule = fixed.get("schedule", TrainConfig.model_fields["schedule"].default)
    ends = zip(low_high("epochs"), low_high("step_size_epochs"), low_high("cycles"), strict=True)
    low, high = (planned_epochs(schedule, *end) for end in ends)
    return low, high


def fidelity(fixed: dict, bounds: dict) -> dict:
    """How much training a study gives each trial: examples per class of the training split
    ("all": no subset) and passes over it (a range when the study searches them). A coarse
    study may run at a lower fidelity than the study narrowed from it; the narrowing record
    keeps both."""
    low, high = epoch_range(fixed, bounds)
    return {"n_per_class": fixed.get("n_per_class") or "all",
            "epochs": low if low == high else [low, high]}


def describe_fidelity(f: dict) -> str:
    """``fidelity``'s record in words: "1000 examples per class, 4 to 16 epochs"."""
    epochs = f["epochs"]
    span = (f"{epochs[0]:g} to {epochs[1]:g}" if isinstance(epochs, list) else f"{epochs:g}")
    subset = ("the whole training split" if f["n_per_class"] == "all"
              else f"{f['n_per_class']} examples per class")
    return f"{subset}, {span} epochs"


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (all problems at once)."""


class TrainConfig(BaseModel):
    """Everything that determines one training run. Defaults are a sensible digits run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- data ---------------------------------------------------------------------------------
    dataset: Dataset = "digits"
    """Dataset name (DATASETS); `digits` ships inside scikit-learn and needs no download."""
    data_dir: str | None = None
    """Folder holding downloaded datasets (torchvision layout); None: the usual places."""
    data_seed: int = 0
    """Seed of the train/validation split; fixed per study so every trial sees the same split."""
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of the training split held out for validation (stratified)."""
    n_per_class: int | None = Field(None, ge=1)
    """Class-balanced training subset: this many examples of each class (None: all)."""
    resize: int | None = Field(None, ge=4)
    """Resize images to resize x resize (bilinear, before normalisation); None: native size.
    A transfer run takes its source's size, so a 28x28 CNN reads 8x8 digits."""
    train_on: Literal["train", "train+val"] = "train"
    """`train+val`: fit on the training and validation splits together (a study's final run).
    No validation remains, so the last epoch's model is kept instead of the best one's."""

    # -- model --------------------------------------------------------------------------------
    arch: Literal["mlp", "cnn"] = "mlp"
    """`mlp`, or `cnn`: conv blocks followed by the same MLP head."""
    depth: int = Field(1, ge=0)
    """Hidden fully-connected layers (0 = softmax regression / linear head)."""
    width: int = Field(64, ge=1)
    """Units per hidden layer."""
    activation: Literal["relu", "sigmoid", "tanh", "lecun_tanh"] = "relu"
    """Hidden activation; lecun_tanh is 1.7159*tanh(2x/3), the "improved sigmoid"."""
    init: Literal["default", "fan_in"] = "default"
    """`default`: PyTorch's; `fan_in`: N(0, 1/fan_in) weights and zero biases (LeCun)."""
    batch_norm: bool = False
    """Batch normalisation after each hidden layer (before the activation)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability after each hidden activation."""
    conv_blocks: int = Field(2, ge=1)
    """CNN only: number of conv(3x3)-activation-maxpool blocks."""
    channels: int = Field(16, ge=1)
    """CNN only: channels of the first block, doubled in each further block."""

    # -- optimisation -------------------------------------------------------------------------
    optimizer: Literal["sgd", "momentum", "nesterov", "adam", "adamw"] = "sgd"
    """`momentum` and `nesterov` are SGD with that momentum."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Momentum for `momentum` / `nesterov`."""
    l2_lambda: float = Field(0.0, ge=0.0)
    """L2 strength: cost = loss + l2_lambda * sum of squared weights (not biases)."""
    batch_size: int = Field(100, ge=1)
    schedule: Literal["constant", "cyclical"] = "cyclical"
    """`constant` uses lr for `epochs`; `cyclical` is triangular between eta_min and eta_max."""
    lr: float = Field(0.01, gt=0.0)
    """Constant schedule: the learning rate."""
    epochs: int = Field(10, ge=1)
    """Constant schedule: passes over the training split."""
    eta_min: float = Field(1e-5, gt=0.0)
    """Cyclical schedule: lowest learning rate."""
    eta_max: float = Field(1e-1, gt=0.0)
    """Cyclical schedule: highest learning rate."""
    step_size_epochs: int = Field(2, ge=1)
    """Cyclical schedule: half-cycle n_s, in epochs' worth of updates."""
    cycles: int = Field(1, ge=1)
    """Cyclical schedule: number of cycles; updates = 2 * n_s * cycles."""

    # -- run ----------------------------------------------------------------------------------
    seed: int = 0
    """Training seed: initialisation, shuffling and dropout."""
    device: str = "cpu"
    """`cpu`, `cuda`, or `auto` (cuda when available)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for this run (None: PyTorch's default, one per core). 1 is often as fast for
    small models, and much faster when other processes share the cores."""
    eval_test_each_epoch: bool = False
    """Also evaluate the test split after every epoch (metrics `epoch_test_loss` /
    `epoch_test_acc`), for a train/validation/test curve in a report. Reporting only: the best
    epoch and every selection still use validation alone."""
    pretrained: str | None = None
    """Path of a state dict saved by this pipeline to start from (transfer)."""
    freeze: Literal["none", "features"] = "none"
    """With `pretrained`: `features` trains only the final layer (linear probe)."""
    transfer: Literal["scratch", "linear_probe", "fine_tune"] | None = None
    """A transfer setup: `scratch` (no checkpoint), `linear_probe` (frozen features) or
    `fine_tune` (all layers trained) from `pretrained`, both with a new final layer. In a study
    with a `source`, the engine supplies `pretrained`."""

    @model_validator(mode="after")
    def _check_cross_field(self) -> TrainConfig:
        if problems := cross_field_problems(self.model_dump()):
            raise ValueError("; ".join(problems))
        return self

    @property
    def n_epochs(self) -> int:
        """Passes over the training split this configuration makes."""
        return int(planned_epochs(self.schedule, self.epochs, self.step_size_epochs, self.cycles))


def cross_field_problems(values: dict) -> list[str]:
    """Rules between fields, checked on raw values too so they are reported with field errors."""
    get = {**{k: f.default for k, f in TrainConfig.model_fields.items()}, **values}.get
    problems = []
    try:
        if get("schedule") == "cyclical" and float(get("eta_min")) >= float(get("eta_max")):
            problems.append(f"eta_min ({get('eta_min')}) must be below eta_max ({get('eta_max')})")
    except (TypeError, ValueError):
        pass  # a non-number is already reported by its field
    if get("freeze") not in (None, "none") and get("pretrained") is None:
        problems.append("freeze needs a pretrained checkpoint (--pretrained PATH)")
    transfer = get("transfer")
    if transfer in ("linear_probe", "fine_tune") and get("pretrained") is None:
        problems.append(f"transfer={transfer} needs a pretrained checkpoint (--pretrained PATH, "
                        "or a study `source`)")
    if transfer == "scratch" and get("pretrained") is not None:
        problems.append("transfer=scratch starts from fresh weights: drop pretrained")
    if transfer == "fine_tune" and get("freeze") not in (None, "none"):
        problems.append("transfer=fine_tune trains every layer: drop freeze (or use "
                        "transfer=linear_probe)")
    return problems


def validation_problems(err: ValidationError) -> list[str]:
    """One readable line per problem pydantic found."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against the documented keys)"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def format_problems(where: str, problems: list[str]) -> str:
    return f"{where}: {len(problems)} problem(s):" + "".join(f"\n  - {p}" for p in problems)


def make_train_config(values: dict, where: str = "training settings") -> TrainConfig:
    """Build a TrainConfig, turning validation errors into one ConfigError."""
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        problems = validation_problems(err)
        if not any(e["loc"] == () for e in err.errors()):
            problems += cross_field_problems(values)  # pydantic skips them when a field failed
        raise ConfigError(format_problems(where, problems)) from None
