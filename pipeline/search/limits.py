"""Hard limits on searched settings: how far a fine study may widen its parent's range
([docs/narrowing.md](../../docs/narrowing.md#widening-and-limits)).

The one place the built-in limits live:

- a setting's own bounds, as ``TrainConfig`` declares them (``depth >= 0``, ``dropout < 1``);
- a log scale's: above 0 (at least 1 for an integer);
- an ordered pair's (``eta_min`` below ``eta_max``): neither widens past the other.

A study file's ``limits:`` may only tighten them. They reach ``narrow`` as plain closed bounds,
``{name: {"low": x or None, "high": y or None}}``: an open bound (``dropout < 1``) becomes the
nearest value inside it.
"""

from __future__ import annotations

import math
import operator
import typing
from collections.abc import Mapping

from pydantic import Field, model_validator

from pipeline.config import TrainConfig
from pipeline.search.params import FloatParam, FrozenModel, IntParam

ORDERED_PAIRS = (("eta_min", "eta_max"),)  # (low, high) settings that must never cross
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


class Limit(FrozenModel):
    """A hard limit on one searched setting (either side optional): a fine study's range
    never widens past it."""

    low: float | None = Field(None, allow_inf_nan=False)
    high: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> Limit:
        if self.low is None and self.high is None:
            raise ValueError("give low, high or both")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self


def setting_kind(name: str) -> str | None:
    """``"int"`` or ``"float"`` for a numeric training setting, else None."""
    field = TrainConfig.model_fields.get(name)
    if field is None:
        return None
    kinds = set(typing.get_args(field.annotation) or (field.annotation,)) - {type(None)}
    return {frozenset({int}): "int", frozenset({float}): "float"}.get(frozenset(kinds))


def constraints(name: str, log: bool) -> list[tuple[str, float, str]]:
    """What a setting's nature demands of its values: (operator, bound, why)."""
    out = []
    for meta in getattr(TrainConfig.model_fields.get(name), "metadata", ()):
        out += [(op, getattr(meta, key), "") for key, op in
                (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                if getattr(meta, key, None) is not None]
    return out + [(">", 0, " on a log scale")] if log else out


def natural_limit(name: str, kind: str, log: bool) -> dict:
    """The closed bounds a setting's nature sets (an open bound moved just inside)."""
    low = high = None
    for op, bound, _ in constraints(name, log):
        if op in (">=", ">"):
            inside = bound if op == ">=" else (
                math.floor(bound) + 1 if kind == "int" else math.nextafter(bound, math.inf))
            low = inside if low is None else max(low, inside)
        else:
            inside = bound if op == "<=" else (
                math.ceil(bound) - 1 if kind == "int" else math.nextafter(bound, -math.inf))
            high = inside if high is None else min(high, inside)
    return {"low": low, "high": high}


def _value_problems(name: str, kind: str, log: bool, limit: Limit) -> list[str]:
    problems = []
    for side, value in (("low", limit.low), ("high", limit.high)):
        if value is None:
            continue
        if kind == "int" and value != int(value):
            problems.append(f"limits.{name}.{side}: {value:g} is not a whole number ({name} is "
                            "an integer)")
        problems += [f"limits.{name}.{side}: {name} must be {op} {bound:g}{why} (got {value:g})"
                     for op, bound, why in constraints(name, log) if not _OPS[op](value, bound)]
    return problems


def limit_problems(limits: Mapping[str, Limit], space: Mapping, fixed: Mapping,
                   has_parent: bool) -> list[str]:
    """A study file's ``limits``: each names a searched float or int setting, lies within what
    the setting can take, and contains the study's own range of it."""
    problems = []
    for name, limit in limits.items():
        spec, kind = space.get(name), setting_kind(name)
        if name not in TrainConfig.model_fields:
            problems.append(f"limits.{name}: not a training setting")
        elif kind is None or (spec is not None and not isinstance(spec, (FloatParam, IntParam))):
            problems.append(f"limits.{name}: limits apply to float and int parameters; {name} "
                            "is not searched as one")
        elif name in fixed:
            problems.append(f"limits.{name}: {name} is fixed, not searched; drop the limit")
        elif spec is None and not has_parent:
            problems.append(f"limits.{name}: {name} is not searched (not in space)")
        else:
            problems += _value_problems(name, kind, bool(spec and spec.log), limit)
            for side, value, outside in (("low", limit.low, operator.lt),
                                         ("high", limit.high, operator.gt)):
                if spec is not None and value is not None and outside(getattr(spec, side), value):
                    problems.append(f"space.{name}: {side} ({getattr(spec, side):g}) lies outside "
                                    f"limits.{name}.{side} ({value:g})")
    return problems


def pair_problems(space: Mapping, fixed: Mapping) -> list[str]:
    """A study file's own ranges of an ordered pair must never cross."""
    def bounds(name):
        spec = space.get(name)
        if isinstance(spec, (FloatParam, IntParam)):
            return spec.low, spec.high
        if name in fixed and isinstance(fixed[name], (int, float)):
            return fixed[name], fixed[name]
        return None

    problems = []
    for low_name, high_name in ORDERED_PAIRS:
        lo, hi = bounds(low_name), bounds(high_name)
        if lo and hi and lo[1] > hi[0]:
            problems.append(f"space: {low_name} (up to {lo[1]:g}) can exceed {high_name} (from "
                            f"{hi[0]:g}); make {low_name}'s high <= {high_name}'s low")
    return problems


def derived_limits(parent_space: Mapping[str, Mapping], declared: Mapping[str, Limit],
                   space: Mapping, fixed: Mapping) -> tuple[dict[str, dict], list[str]]:
    """The limits of each parameter a fine study derives from ``parent_space`` (plain specs):
    the tightest of the built-in ones and the study file's; and the problems of the file's
    limits that only the parent's space reveals (a log scale, a categorical, no such
    parameter)."""
    derived = {n: s for n, s in parent_space.items()
               if n not in fixed and n not in space and s["type"] in ("float", "int")}
    problems = []
    for name, limit in declared.items():
        spec = parent_space.get(name)
        if name in space or name in fixed:
            continue  # checked with the study file
        if spec is None:
            problems.append(f"limits.{name}: {name} is not searched (neither in space nor in the "
                            "parent's space)")
        elif name not in derived:
            problems.append(f"limits.{name}: limits apply to float and int parameters; the "
                            f"parent searches {name} as a {spec['type']}")
        else:
            problems += _value_problems(name, spec["type"], bool(spec.get("log")), limit)
    pairs = _pair_limits(parent_space, derived, space, fixed)
    limits = {}
    for name, spec in derived.items():
        given = declared[name].model_dump() if name in declared else {}
        sources = [natural_limit(name, spec["type"], bool(spec.get("log"))), given,
                   pairs.get(name, {})]
        lows = [s["low"] for s in sources if s.get("low") is not None]
        highs = [s["high"] for s in sources if s.get("high") is not None]
        cast = int if spec["type"] == "int" else float
        limits[name] = {side: None if v is None else cast(v) for side, v in
                        (("low", max(lows, default=None)), ("high", min(highs, default=None)))}
    return limits, problems


def _pair_limits(parent_space, derived, space, fixed) -> dict[str, dict]:
    """An ordered pair's derived members stop at the other's range: at a cut between the two
    parent ranges when both are derived (their meeting point, the middle of a gap)."""
    def known(name):  # the range of a member not derived: its own space entry, fixed, default
        spec = space.get(name)
        if isinstance(spec, (FloatParam, IntParam)):
            return spec.low, spec.high
        if spec is not None or (name in parent_space and name not in fixed):
            return None  # searched as a categorical
        value = fixed.get(name, TrainConfig.model_fields[name].default)
        return (value, value) if isinstance(value, (int, float)) else None

    out = {}
    for a, b in ORDERED_PAIRS:
        if a in derived and b in derived:
            x, y = parent_space[a]["high"], parent_space[b]["low"]
            cut = x if x == y else math.sqrt(x * y) if x > 0 and y > 0 else (x + y) / 2
            out[a], out[b] = {"high": cut}, {"low": cut}
        elif a in derived and (rb := known(b)):
            out[a] = {"high": rb[0]}
        elif b in derived and (ra := known(a)):
            out[b] = {"low": ra[1]}
    return out
