"""Coarse -> fine narrowing as pure functions over plain data (no Optuna, no MLflow).

A space is ``{name: {"type": "float"|"int"|"categorical", "low", "high", "log", "step",
"choices"}}``; a trial is ``{"number", "value", "params"}``. For each parameter the fine range is
the interval spanned by the parent's best trials, padded by ``margin`` times its span (in log space
for log parameters), clipped to the parent's range, integers rounded outward; categoricals keep the
values seen among the best trials. A parameter is flagged when most of the best values sit near an
edge of the parent range: the optimum may lie outside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DEGENERATE_SPAN = 0.1  # when all best trials agree, keep this share of the parent range open


class NarrowingError(ValueError):
    """The parent study cannot narrow a space (e.g. no completed trial)."""


def select_top(trials: Sequence[Mapping], direction: str, top_k: int | None = None,
               top_fraction: float | None = None) -> list[Mapping]:
    """The best completed trials (value not None), best first; ties broken by trial number."""
    done = [t for t in trials if t.get("value") is not None and math.isfinite(t["value"])]
    if not done:
        raise NarrowingError("the parent study has no completed trial to narrow from")
    sign = -1.0 if direction == "maximize" else 1.0
    ranked = sorted(done, key=lambda t: (sign * t["value"], t["number"]))
    if top_fraction is not None:
        k = max(2, round(top_fraction * len(ranked)))
    else:
        k = top_k or 5
    return ranked[:min(k, len(ranked))]


def _to_unit(spec: Mapping, v: float) -> float:
    return math.log(v) if spec.get("log") else float(v)


def _from_unit(spec: Mapping, u: float) -> float:
    return math.exp(u) if spec.get("log") else u


def narrow_param(spec: Mapping, values: Sequence[Any], margin: float) -> dict:
    """The narrowed spec of one parameter from the values its best trials took."""
    if spec["type"] == "bundle":  # named bundles of settings: keep the names seen, as dicts
        seen = {c: s for c, s in spec["choices"].items() if c in values}
        return {**spec, "choices": seen or dict(spec["choices"])}
    if spec["type"] == "categorical":
        seen = [c for c in spec["choices"] if c in values]
        return {**spec, "choices": seen or list(spec["choices"])}
    lo_p, hi_p = _to_unit(spec, spec["low"]), _to_unit(spec, spec["high"])
    us = [_to_unit(spec, v) for v in values]
    lo, hi = min(us), max(us)
    span = hi - lo if hi > lo else DEGENERATE_SPAN * (hi_p - lo_p)
    new_lo = max(lo_p, lo - margin * span)
    new_hi = min(hi_p, hi + margin * span)
    if hi == lo and margin == 0:
        new_lo, new_hi = max(lo_p, lo - span / 2), min(hi_p, hi + span / 2)
    low, high = _from_unit(spec, new_lo), _from_unit(spec, new_hi)
    if spec["type"] == "int":
        step = spec.get("step", 1)
        low = max(spec["low"], spec["low"] + step * math.floor((low - spec["low"]) / step + 1e-9))
        high = min(spec["high"], spec["low"] + step * math.ceil((high - spec["low"]) / step - 1e-9))
        if low >= high:  # an int range needs two values: widen by one step inside the parent
            low, high = (low, low + step) if low + step <= spec["high"] else (high - step, high)
        return {**spec, "low": int(low), "high": int(high)}
    return {**spec, "low": max(spec["low"], low), "high": min(spec["high"], high)}


def boundary_flag(spec: Mapping, values: Sequence[Any], fraction: float) -> str | None:
    """'low' or 'high' when at least half of the best values lie within ``fraction`` of the
    parent's range from that edge (in log space for log parameters); else None."""
    if spec["type"] in ("categorical", "bundle") or not values:
        return None
    lo_p, hi_p = _to_unit(spec, spec["low"]), _to_unit(spec, spec["high"])
    width = hi_p - lo_p
    us = [_to_unit(spec, v) for v in values]
    near_low = sum(u <= lo_p + fraction * width for u in us)
    near_high = sum(u >= hi_p - fraction * width for u in us)
    half = len(us) / 2
    if near_low >= half and near_low >= near_high:
        return "low"
    if near_high >= half:
        return "high"
    return None


def clip_params(params: Mapping[str, Any], space: Mapping[str, Mapping]) -> dict[str, Any]:
    """A configuration moved into ``space``: numbers clipped, unknown keys dropped."""
    out = {}
    for name, spec in space.items():
        if name not in params:
            continue
        v = params[name]
        if spec["type"] in ("categorical", "bundle"):
            out[name] = v if v in spec["choices"] else next(iter(spec["choices"]))
        else:
            v = min(max(v, spec["low"]), spec["high"])
            out[name] = int(round(v)) if spec["type"] == "int" else float(v)
    return out


def narrow_space(parent_space: Mapping[str, Mapping], trials: Sequence[Mapping], direction: str,
                 *, top_k: int | None = None, top_fraction: float | None = None,
                 margin: float = 0.25, boundary_fraction: float = 0.1, enqueue: int = 3,
                 keep: Sequence[str] | None = None) -> dict:
    """Narrow ``parent_space`` around the best ``trials``.

    Returns the record: ``space`` (the new space), ``seeds`` (best configurations clipped into
    it), ``trials`` (numbers used), ``params`` (old and new bounds and boundary flag per
    parameter) and the rule. ``keep`` limits the parameters carried over (None: all).
    """
    top = select_top(trials, direction, top_k, top_fraction)
    names = [n for n in parent_space if keep is None or n in keep]
    new_space, report = {}, {}
    for name in names:
        spec = parent_space[name]
        values = [t["params"][name] for t in top if name in t["params"]]
        new = narrow_param(spec, values, margin) if values else dict(spec)
        new_space[name] = new
        report[name] = {"old": dict(spec), "new": new,
                        "best_values": values,
                        "boundary": boundary_flag(spec, values, boundary_fraction)}
    return {
        "rule": {"top_k": top_k, "top_fraction": top_fraction, "margin": margin,
                 "boundary_fraction": boundary_fraction, "direction": direction},
        "k": len(top),
        "trials": [t["number"] for t in top],
        "values": [t["value"] for t in top],
        "params": report,
        "space": new_space,
        "seeds": [clip_params(t["params"], new_space) for t in top[:enqueue]],
        "boundary_flags": {n: r["boundary"] for n, r in report.items() if r["boundary"]},
    }
