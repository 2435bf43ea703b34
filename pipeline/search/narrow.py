"""Coarse -> fine narrowing (and widening) as pure functions over plain data (no Optuna, no
MLflow).

A space is ``{name: {"type": "float"|"int"|"categorical", "low", "high", "log", "step",
"choices"}}``; a trial is ``{"number", "value", "params"}``. For each parameter the fine range is
the interval spanned by the parent's best trials, padded by ``margin`` times its span (in log space
for log parameters), clipped to the parent's range, integers rounded outward; categoricals keep the
values seen among the best trials. A parameter is flagged when most of the best values sit near an
edge of the parent range: the optimum may lie outside it, so on that side the fine range goes past
the parent's edge by the same padding, up to the parameter's hard limits (given as plain bounds;
pipeline.search.limits computes them).
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


def narrow_param(spec: Mapping, values: Sequence[Any], margin: float,
                 widen: str | None = None, limit: Mapping | None = None) -> dict:
    """The new spec of one parameter from the values its best trials took (narrow_edges)."""
    return narrow_edges(spec, values, margin, widen, limit)[0]


def narrow_edges(spec: Mapping, values: Sequence[Any], margin: float,
                 widen: str | None = None, limit: Mapping | None = None) -> tuple[dict, dict]:
    """The new spec of one parameter, and how its edges moved past the parent's.

    Each side is the best values' extreme padded by ``margin`` x their span (in log space for log
    parameters) and clipped to the parent's edge, except the ``widen`` side (``"low"`` or
    ``"high"``: the best values crowd that edge), which goes past the parent's edge by the same
    padding. No side passes ``limit`` (closed bounds, ``{"low", "high"}``, either None).
    Integers round outward, on the step grid. The edges: ``{side: {"change": "widened" |
    "widened, clipped at limit" | "clipped at limit", "old", "new"[, "limit"]}}`` for each side
    that moved past the parent's edge or that a limit stopped.
    """
    if spec["type"] == "bundle":  # named bundles of settings: keep the names seen, as dicts
        seen = {c: s for c, s in spec["choices"].items() if c in values}
        return {**spec, "choices": seen or dict(spec["choices"])}, {}
    if spec["type"] == "categorical":
        seen = [c for c in spec["choices"] if c in values]
        return {**spec, "choices": seen or list(spec["choices"])}, {}
    lo_p, hi_p = _to_unit(spec, spec["low"]), _to_unit(spec, spec["high"])
    us = [_to_unit(spec, v) for v in values]
    lo, hi = min(us), max(us)
    span = hi - lo if hi > lo else DEGENERATE_SPAN * (hi_p - lo_p)
    pad = span / 2 if hi == lo and margin == 0 else margin * span  # all agree, no margin: centred
    target = {"low": _from_unit(spec, min(lo, lo_p) - pad if widen == "low" else lo - pad),
              "high": _from_unit(spec, max(hi, hi_p) + pad if widen == "high" else hi + pad)}
    limit = {k: v for k, v in (limit or {}).items() if v is not None}
    step, base = spec.get("step", 1), spec["low"]
    if spec["type"] == "int":  # outward for the range, inward for the limits
        target = {"low": base + step * math.floor((target["low"] - base) / step + 1e-9),
                  "high": base + step * math.ceil((target["high"] - base) / step - 1e-9)}
        limit = {side: base + step * (math.ceil if side == "low" else math.floor)(
            (v - base) / step + (-1e-9 if side == "low" else 1e-9)) for side, v in limit.items()}
    floor = [v for v in (limit.get("low"), None if widen == "low" else spec["low"])
             if v is not None]
    ceil = [v for v in (limit.get("high"), None if widen == "high" else spec["high"])
            if v is not None]
    bound = {"low": max(floor, default=None), "high": min(ceil, default=None)}
    new = {"low": target["low"] if bound["low"] is None else max(bound["low"], target["low"]),
           "high": target["high"] if bound["high"] is None else min(bound["high"], target["high"])}
    if spec["type"] == "int" and new["low"] == new["high"]:  # an int range needs two values
        up = bound["high"] is None or new["low"] + step <= bound["high"]
        new = ({"low": new["low"], "high": new["low"] + step} if up
               else {"low": new["high"] - step, "high": new["high"]})
    if not (new["low"] < new["high"] and (bound["low"] is None or new["low"] >= bound["low"])):
        raise NarrowingError(f"its limits (low {limit.get('low')}, high {limit.get('high')}) "
                             f"leave no range around the best values {min(values)} to "
                             f"{max(values)}")
    cast = int if spec["type"] == "int" else float
    return {**spec, "low": cast(new["low"]), "high": cast(new["high"])}, _edges(
        spec, target, new, bound, limit, widen)


def _edges(spec, target, new, bound, limit, widen) -> dict:
    edges = {}
    for side, beyond in (("low", lambda a, b: a < b), ("high", lambda a, b: a > b)):
        old, lim = spec[side], limit.get(side)
        widened = beyond(new[side], old)
        # a limit stopped this side: it bound it (on the widened side, or tighter than the
        # parent's edge) and the padded value lay past it
        clipped = (lim is not None and bound[side] == lim and beyond(target[side], lim)
                   and (widen == side or beyond(old, lim)))
        if widened or clipped:
            change = ", ".join(c for c, on in (("widened", widened), ("clipped at limit", clipped))
                               if on)
            edges[side] = {"change": change, "old": old, "new": new[side],
                           **({"limit": lim} if clipped else {})}
    return edges


def describe_edges(edges: Mapping[str, Mapping]) -> str:
    """The edges of one parameter in words: ``high 4 → 5 (widened)``; empty when none moved."""
    parts = []
    for side in ("low", "high"):
        if e := edges.get(side):
            moved = f"{e['old']:.4g}" + (f" → {e['new']:.4g}" if e["new"] != e["old"] else "")
            parts.append(f"{side} {moved} ({e['change']})")
    return "; ".join(parts)


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
                 keep: Sequence[str] | None = None,
                 limits: Mapping[str, Mapping] | None = None) -> dict:
    """Narrow ``parent_space`` around the best ``trials``, widening each flagged edge.

    Returns the record: ``space`` (the new space), ``seeds`` (best configurations clipped into
    it), ``trials`` (numbers used), ``params`` (old and new bounds, boundary flag and the edges
    that widened or a limit stopped, per parameter), ``limits`` and the rule. ``keep`` limits the
    parameters carried over (None: all); ``limits``: closed bounds per parameter (none: none).
    """
    top = select_top(trials, direction, top_k, top_fraction)
    names = [n for n in parent_space if keep is None or n in keep]
    limits = {n: dict(b) for n, b in (limits or {}).items() if n in names}
    new_space, report = {}, {}
    for name in names:
        spec = parent_space[name]
        values = [t["params"][name] for t in top if name in t["params"]]
        flag = boundary_flag(spec, values, boundary_fraction)
        try:
            new, edges = (narrow_edges(spec, values, margin, flag, limits.get(name)) if values
                          else (dict(spec), {}))
        except NarrowingError as err:
            raise NarrowingError(f"{name}: {err}") from None
        new_space[name] = new
        report[name] = {"old": dict(spec), "new": new, "best_values": values,
                        "boundary": flag, "edges": edges}
    return {
        "rule": {"top_k": top_k, "top_fraction": top_fraction, "margin": margin,
                 "boundary_fraction": boundary_fraction, "direction": direction},
        "k": len(top),
        "trials": [t["number"] for t in top],
        "values": [t["value"] for t in top],
        "params": report,
        "limits": limits,
        "space": new_space,
        "seeds": [clip_params(t["params"], new_space) for t in top[:enqueue]],
        "boundary_flags": {n: r["boundary"] for n, r in report.items() if r["boundary"]},
    }
