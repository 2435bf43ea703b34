"""The kinds of searched parameter a study file declares: float, int, categorical, bundle.

Plain pydantic specs (no Optuna): ``space`` turns them into Optuna's suggestions and
distributions, ``narrow`` works on their plain (``model_dump``) form.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import TrainConfig


class FrozenModel(BaseModel):
    """Study-file entries: immutable, and a misspelt key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class FloatParam(FrozenModel):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    """Sample log-uniformly; for scale-like parameters (lambda, learning rates)."""

    def problems(self) -> list[str]:
        out = ([] if self.low < self.high
               else [f"low ({self.low:g}) must be below high ({self.high:g})"])
        if self.log and self.low <= 0:
            out.append(f"log scale needs low > 0 (got {self.low:g})")
        return out


class IntParam(FrozenModel):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    def problems(self) -> list[str]:
        out = [] if self.low < self.high else [f"low ({self.low}) must be below high ({self.high})"]
        if self.log and self.low <= 0:
            out.append(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step != 1:
            out.append("log scale needs step 1")
        return out


class CategoricalParam(FrozenModel):
    type: Literal["categorical"]
    choices: tuple[Any, ...] = Field(min_length=1)

    def problems(self) -> list[str]:
        unique = len(set(map(repr, self.choices))) == len(self.choices)
        return [] if unique else ["duplicate choices"]


class BundleParam(FrozenModel):
    """A categorical parameter whose choices are named bundles of training settings: a trial
    gets every setting of the bundle it draws (e.g. the cumulative stages of an ablation, each
    a name for several settings). With the grid sampler, each bundle is one grid point."""

    type: Literal["bundle"]
    choices: dict[str, dict[str, Any]] = Field(min_length=1)

    def problems(self) -> list[str]:
        return [f"choice {name!r}: unknown training settings {sorted(unknown)}"
                for name, settings in self.choices.items()
                if (unknown := set(settings) - set(TrainConfig.model_fields))]


ParamSpec = Annotated[FloatParam | IntParam | CategoricalParam | BundleParam,
                      Field(discriminator="type")]
