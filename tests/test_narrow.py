"""Coarse -> fine narrowing on literal tables (pipeline.narrow is pure: no Optuna, no MLflow).

Every expected interval is computed by hand here, from the rule in the module docstring: the span
of the best values, padded by margin x span on each side (in log space for log parameters),
clipped to the parent range, integers rounded outward; on an edge the best values crowd, past the
parent's edge by the same padding, up to the parameter's hard limits (pipeline.search.limits).
"""

from __future__ import annotations

import math
import random

import pytest

from pipeline.search.limits import Limit, derived_limits, limit_problems, natural_limit
from pipeline.search.narrow import (
    NarrowingError,
    boundary_flag,
    clip_params,
    describe_edges,
    narrow_edges,
    narrow_param,
    narrow_space,
    select_top,
)
from pipeline.search.params import FloatParam, IntParam

LIN = {"type": "float", "low": 0.0, "high": 10.0, "log": False}
LOG = {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}
INT = {"type": "int", "low": 1, "high": 10, "log": False, "step": 1}
CAT = {"type": "categorical", "choices": ["relu", "tanh", "sigmoid"]}


def bounds(spec):
    return spec["low"], spec["high"]


# -- floats ---------------------------------------------------------------------------------------


def test_linear_float_is_padded_by_margin_times_span():
    # best values 2..4: span 2, padding 0.25 * 2 = 0.5 on each side
    assert bounds(narrow_param(LIN, [2.0, 4.0, 3.0], 0.25)) == pytest.approx((1.5, 4.5))


def test_linear_float_padding_is_clipped_to_the_parent_range():
    # 0.2..1.0: span 0.8, padding 0.4 -> (-0.2, 1.4), clipped below at the parent's 0
    assert bounds(narrow_param(LIN, [0.2, 1.0], 0.5)) == pytest.approx((0.0, 1.4))
    # 9..10: span 1, padding 0.5 -> (8.5, 10.5), clipped above at the parent's 10
    assert bounds(narrow_param(LIN, [9.0, 10.0], 0.5)) == pytest.approx((8.5, 10.0))


def test_log_float_is_padded_in_log_space():
    lo, hi = 1e-4, 1e-3
    span = math.log(hi) - math.log(lo)  # ln 10
    expected = (math.exp(math.log(lo) - 0.25 * span), math.exp(math.log(hi) + 0.25 * span))
    new = narrow_param(LOG, [1e-3, 1e-4, 3e-4], 0.25)
    assert bounds(new) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((1e-4 / 10 ** 0.25, 1e-3 * 10 ** 0.25))  # the same, by hand
    assert new["log"] is True and new["type"] == "float"


def test_log_float_clipped_at_the_top_is_exactly_the_parent_edge():
    new = narrow_param(LOG, [0.05, 0.1], 0.25)
    span = math.log(0.1) - math.log(0.05)
    assert new["low"] == pytest.approx(math.exp(math.log(0.05) - 0.25 * span))
    assert new["high"] == 0.1


def test_margin_zero_keeps_exactly_the_span_of_the_best_values():
    assert bounds(narrow_param(LIN, [3.0, 7.0], 0.0)) == (3.0, 7.0)


def test_all_equal_floats_keep_a_tenth_of_the_parent_range_as_span():
    # degenerate span: 0.1 * (10 - 0) = 1, then the usual margin: 4 -+ 0.25
    assert bounds(narrow_param(LIN, [4.0, 4.0, 4.0], 0.25)) == pytest.approx((3.75, 4.25))


def test_all_equal_floats_with_zero_margin_get_the_degenerate_span_centred():
    # with no margin the degenerate span (1) is split around the value: 4 -+ 0.5
    assert bounds(narrow_param(LIN, [4.0, 4.0], 0.0)) == pytest.approx((3.5, 4.5))


def test_all_equal_log_floats_use_a_tenth_of_the_log_range():
    span = 0.1 * (math.log(1e-1) - math.log(1e-5))
    expected = (math.exp(math.log(1e-3) - 0.25 * span), math.exp(math.log(1e-3) + 0.25 * span))
    assert bounds(narrow_param(LOG, [1e-3, 1e-3], 0.25)) == pytest.approx(expected, rel=1e-12)


# -- integers -------------------------------------------------------------------------------------


def test_int_bounds_are_rounded_outward():
    # 3..5: span 2, padding 0.5 -> (2.5, 5.5) -> floor 2, ceil 6
    new = narrow_param(INT, [3, 5, 4], 0.25)
    assert (new["low"], new["high"]) == (2, 6)
    assert type(new["low"]) is int and type(new["high"]) is int


def test_int_bounds_already_whole_stay():
    # 2..6: span 4, padding 1 -> (1, 7) exactly
    assert bounds(narrow_param(INT, [2, 6], 0.25)) == (1, 7)


def test_int_with_step_rounds_outward_onto_the_step_grid():
    spec = {"type": "int", "low": 0, "high": 100, "log": False, "step": 10}
    # 30..50: span 20, padding 2 -> (28, 52) -> 20 and 60 on the grid 0, 10, ..., 100
    assert bounds(narrow_param(spec, [30, 50], 0.1)) == (20, 60)


def test_log_int_is_padded_in_log_space_then_rounded_outward():
    spec = {"type": "int", "low": 16, "high": 512, "log": True, "step": 1}
    lo = 64 * 2 ** -0.25  # 53.8: ln span is ln 2, a quarter of it on each side
    hi = 128 * 2 ** 0.25  # 152.2
    assert bounds(narrow_param(spec, [64, 128], 0.25)) == (math.floor(lo), math.ceil(hi))
    assert (math.floor(lo), math.ceil(hi)) == (53, 153)


def test_all_equal_ints_keep_a_range_of_several_values():
    # degenerate span 0.1 * 9 = 0.9, padding 0.225: (1.775, 2.225) -> (1, 3)
    assert bounds(narrow_param(INT, [2, 2, 2], 0.25)) == (1, 3)


def test_an_int_range_never_collapses_to_one_value():
    spec = {"type": "int", "low": 1, "high": 2, "log": True, "step": 1}
    # 1 padded by a tenth of ln 2 stays below 2 and would round to (1, 1): widened to (1, 2)
    assert bounds(narrow_param(spec, [1, 1], 0.25)) == (1, 2)


def test_int_clipped_at_the_parent_edges():
    assert bounds(narrow_param(INT, [1, 10], 0.25)) == (1, 10)


# -- categoricals ---------------------------------------------------------------------------------


def test_categorical_keeps_the_values_seen_in_parent_order():
    new = narrow_param(CAT, ["sigmoid", "relu", "sigmoid"], 0.25)
    assert new["choices"] == ["relu", "sigmoid"]
    assert new["type"] == "categorical"


def test_categorical_with_one_value_seen_keeps_it_alone():
    assert narrow_param(CAT, ["tanh", "tanh"], 0.25)["choices"] == ["tanh"]


def test_categorical_with_no_known_value_seen_keeps_every_choice():
    assert narrow_param(CAT, ["gelu"], 0.25)["choices"] == ["relu", "tanh", "sigmoid"]


# -- property: the new range lies in the old one and covers the best values -----------------------


@pytest.mark.parametrize("seed", range(40))
def test_new_range_lies_in_the_parent_range_and_covers_the_best_values(seed):
    rng = random.Random(seed)
    log = rng.random() < 0.5
    if rng.random() < 0.5:
        low = 10 ** rng.uniform(-6, -1) if log else rng.uniform(-5, 5)
        high = low * 10 ** rng.uniform(0.5, 4) if log else low + rng.uniform(0.1, 10)
        spec = {"type": "float", "low": low, "high": high, "log": log}
        values = [math.exp(rng.uniform(math.log(low), math.log(high))) if log
                  else rng.uniform(low, high) for _ in range(rng.randint(1, 6))]
    else:
        low = rng.randint(1, 20)
        high = low + rng.randint(1, 500)
        spec = {"type": "int", "low": low, "high": high, "log": log, "step": 1}
        values = [rng.randint(low, high) for _ in range(rng.randint(1, 6))]
    new = narrow_param(spec, values, rng.choice([0.0, 0.1, 0.25, 1.0]))
    assert spec["low"] <= new["low"] < new["high"] <= spec["high"]
    assert new["low"] <= min(values) and max(values) <= new["high"]


# -- boundary flags -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, values, expected", [
    (LIN, [0.5, 0.8, 5.0], "low"),        # 2 of 3 within 1.0 of the low edge
    (LIN, [9.5, 9.95, 3.0], "high"),      # 2 of 3 within 1.0 of the high edge
    (LIN, [2.0, 5.0, 8.0], None),         # spread out
    (LIN, [0.5, 5.0, 6.0, 7.0], None),    # one of four near an edge: not half
    (LIN, [0.5, 9.5], "low"),             # half at each edge: the tie goes to low
    (LIN, [1.0, 5.0], "low"),             # exactly on the 10 % line counts as near
    (LOG, [1.5e-5, 2e-5, 1e-3], "low"),   # within 10**0.4 of 1e-5 in log space
    (LOG, [1e-4, 2e-4], None),            # near 1e-5 on a linear scale, not on a log scale
    ({**LOG, "log": False}, [1e-4, 2e-4], "low"),  # ... which the linear rule does flag
    (LOG, [5e-2, 1e-1], "high"),
    (INT, [1, 1, 5], "low"),              # int range 1..10: 10 % is 0.9 from the edge
    (INT, [10, 10, 2], "high"),
    (CAT, ["relu", "relu"], None),        # categoricals have no edges
    (LIN, [], None),
])
def test_boundary_flag(spec, values, expected):
    assert boundary_flag(spec, values, 0.1) == expected


def test_boundary_fraction_widens_what_counts_as_near():
    assert boundary_flag(LIN, [2.5, 3.0], 0.1) is None
    assert boundary_flag(LIN, [2.5, 3.0], 0.3) == "low"


# -- widening past a crowded edge ----------------------------------------------------------------


def test_a_crowded_top_edge_widens_past_the_parent_by_the_margin():
    # best 9..10 crowd the top of [0, 10]: span 1, padding 0.25; the low side narrows as usual
    # (9 - 0.25), the high side goes past the parent's 10 by the padding
    new, edges = narrow_edges(LIN, [9.0, 9.5, 10.0], 0.25, "high")
    assert bounds(new) == pytest.approx((8.75, 10.25))
    assert edges == {"high": {"change": "widened", "old": 10.0, "new": pytest.approx(10.25)}}
    assert describe_edges(edges) == "high 10 → 10.25 (widened)"


def test_the_widened_edge_is_measured_from_the_parent_edge_not_the_best_values():
    # best 9.2..9.6 (flagged high: within 1.0 of 10): span 0.4, padding 0.1 -> 10 + 0.1
    assert bounds(narrow_param(LIN, [9.2, 9.6], 0.25, "high")) == pytest.approx((9.1, 10.1))


def test_a_crowded_bottom_edge_of_a_log_parameter_widens_in_log_space():
    values = [1.2e-5, 1.5e-5, 2e-5]
    assert boundary_flag(LOG, values, 0.1) == "low"
    new, edges = narrow_edges(LOG, values, 0.25, "low")
    # ln span ln(2 / 1.2), a quarter of it past the parent's 1e-5: 1e-5 * (1.2 / 2) ** 0.25
    assert new["low"] == pytest.approx(1e-5 * (1.2 / 2) ** 0.25, rel=1e-12)
    assert new["high"] == pytest.approx(2e-5 * (2 / 1.2) ** 0.25, rel=1e-12)
    assert 0 < new["low"] < LOG["low"]
    assert edges["low"]["change"] == "widened" and edges["low"]["old"] == 1e-5
    assert describe_edges(edges) == "low 1e-05 → 8.801e-06 (widened)"


def test_the_side_not_crowded_still_clips_to_the_parent_range():
    # 0.5..9.9 flagged high: padding 0.25 * 9.4 = 2.35; low 0.5 - 2.35 stops at the parent's 0
    new, edges = narrow_edges(LIN, [0.5, 9.9], 0.25, "high")
    assert bounds(new) == pytest.approx((0.0, 12.35))
    assert set(edges) == {"high"}


def test_widened_ints_round_outward():
    spec = {"type": "int", "low": 1, "high": 4, "log": False, "step": 1}
    # 3..4 flagged high: span 1, padding 0.25: 2.75 -> 2, 4 + 0.25 -> 5
    assert bounds(narrow_param(spec, [3, 4, 4], 0.25, "high")) == (2, 5)
    # 1..2 flagged low: 1 - 0.25 -> 0 (depth 0 is softmax regression), 2.25 -> 3
    assert bounds(narrow_param(spec, [1, 1, 2], 0.25, "low")) == (0, 3)
    # on a step grid: 80..100 of 0..100 by 10: padding 5 -> 75 -> 70 and 105 -> 110
    stepped = {"type": "int", "low": 0, "high": 100, "log": False, "step": 10}
    assert bounds(narrow_param(stepped, [80, 100], 0.25, "high")) == (70, 110)
    # log ints: 256..512 of 16..512: 512 * 2 ** 0.25 = 608.9 -> 609, 256 / 2 ** 0.25 -> 215
    width = {"type": "int", "low": 16, "high": 512, "log": True, "step": 1}
    new = narrow_param(width, [256, 512], 0.25, "high")
    assert bounds(new) == (215, 609) and type(new["high"]) is int


def test_all_best_values_on_the_edge_widen_by_the_degenerate_span():
    # all at 10: span 0.1 * 10 = 1, padding 0.25 on both sides of 10
    assert bounds(narrow_param(LIN, [10.0, 10.0], 0.25, "high")) == pytest.approx((9.75, 10.25))


def test_no_margin_no_widening():
    new, edges = narrow_edges(LIN, [9.0, 10.0], 0.0, "high")
    assert bounds(new) == (9.0, 10.0) and edges == {}


def test_a_limit_stops_the_widening_and_the_record_says_so():
    new, edges = narrow_edges(LIN, [9.0, 9.5, 10.0], 1.0, "high", {"low": None, "high": 10.3})
    assert bounds(new) == pytest.approx((8.0, 10.3))  # 10 + 1 stopped at 10.3
    assert edges == {"high": {"change": "widened, clipped at limit", "old": 10.0,
                              "new": 10.3, "limit": 10.3}}
    assert describe_edges(edges) == "high 10 → 10.3 (widened, clipped at limit)"
    # a limit at the parent's edge: no widening at all, and the record says why
    spec = {"type": "int", "low": 1, "high": 4, "log": False, "step": 1}
    new, edges = narrow_edges(spec, [3, 4, 4], 0.25, "high", {"high": 4})
    assert bounds(new) == (2, 4)
    assert edges == {"high": {"change": "clipped at limit", "old": 4, "new": 4, "limit": 4}}
    assert describe_edges(edges) == "high 4 (clipped at limit)"


def test_an_int_limit_rounds_inward_onto_the_step_grid():
    stepped = {"type": "int", "low": 0, "high": 100, "log": False, "step": 10}
    new, edges = narrow_edges(stepped, [80, 100], 1.0, "high", {"high": 125})
    assert bounds(new) == (60, 120)  # 100 + 20 = 120 is inside 125: not clipped
    assert edges["high"]["change"] == "widened"
    new, edges = narrow_edges(stepped, [80, 100], 1.0, "high", {"high": 115})
    assert bounds(new) == (60, 110) and edges["high"]["limit"] == 110


def test_a_limit_tighter_than_the_parent_cuts_a_side_that_is_not_crowded():
    # 2..3: padding 0.25 -> 3.25, past the limit 3.1 (the parent's edge is 10)
    new, edges = narrow_edges(LIN, [2.0, 3.0], 0.25, None, {"high": 3.1})
    assert bounds(new) == pytest.approx((1.75, 3.1))
    assert edges == {"high": {"change": "clipped at limit", "old": 10.0, "new": 3.1,
                              "limit": 3.1}}


def test_a_limit_that_leaves_no_range_is_a_narrowing_error_naming_the_parameter():
    trials = [{"number": 0, "value": 1.0, "params": {"x": 8.0}},
              {"number": 1, "value": 0.9, "params": {"x": 9.0}}]
    with pytest.raises(NarrowingError, match=r"^x: its limits .* leave no range"):
        narrow_space({"x": LIN}, trials, "maximize", limits={"x": {"high": 5.0}})
    with pytest.raises(NarrowingError, match="leave no range around the best values 8 to 9"):
        narrow_param(INT, [8, 9], 0.25, None, {"high": 5})
    # a limit that cuts into the best values' span still leaves a range: 7.75 -> 7 -> up to 9
    assert bounds(narrow_param(INT, [8, 9], 0.25, None, {"low": 9})) == (9, 10)


def test_narrow_space_records_widened_and_clipped_edges_with_their_limits():
    parent = {"depth": {"type": "int", "low": 1, "high": 4, "log": False, "step": 1},
              "l2": LOG, "act": CAT}
    trials = [{"number": i, "value": v, "params": {"depth": d, "l2": l2, "act": "relu"}}
              for i, (v, d, l2) in enumerate([(0.9, 4, 1.2e-5), (0.8, 4, 1.5e-5),
                                              (0.7, 3, 2e-5), (0.1, 1, 1e-2)])]
    limits = {"depth": {"low": 0, "high": 4}, "l2": {"low": 1e-300, "high": None}}
    record = narrow_space(parent, trials, "maximize", top_k=3, limits=limits)
    assert record["boundary_flags"] == {"depth": "high", "l2": "low"}
    assert record["params"]["depth"]["edges"] == {
        "high": {"change": "clipped at limit", "old": 4, "new": 4, "limit": 4}}
    assert record["params"]["l2"]["edges"] == {
        "low": {"change": "widened", "old": 1e-5, "new": pytest.approx(1e-5 * 0.6 ** 0.25)}}
    assert record["params"]["act"]["edges"] == {} and record["space"]["act"]["choices"] == [
        "relu"]  # categoricals never widen
    assert record["limits"] == limits
    assert bounds(record["space"]["depth"]) == (2, 4)


@pytest.mark.parametrize("seed", range(40))
def test_a_widened_range_covers_the_best_values_passes_one_edge_and_respects_limits(seed):
    rng = random.Random(seed)
    log, side = rng.random() < 0.5, rng.choice(["low", "high"])
    low = 10 ** rng.uniform(-6, -1) if log else rng.uniform(-5, 5)
    high = low * 10 ** rng.uniform(0.5, 4) if log else low + rng.uniform(0.1, 10)
    spec = {"type": "float", "low": low, "high": high, "log": log}
    values = [math.exp(rng.uniform(math.log(low), math.log(high))) if log
              else rng.uniform(low, high) for _ in range(rng.randint(1, 6))]
    margin = rng.choice([0.1, 0.25, 1.0])
    limit = {"low": low / 2 if log else low - 1, "high": high * 2 if log else high + 1}
    new, edges = narrow_edges(spec, values, margin, side, limit)
    assert new["low"] <= min(values) and max(values) <= new["high"]
    assert limit["low"] <= new["low"] < new["high"] <= limit["high"]
    if side == "high":
        assert spec["low"] <= new["low"] and new["high"] > spec["high"]
    else:
        assert new["high"] <= spec["high"] and new["low"] < spec["low"]
    assert set(edges) == {side} and edges[side]["change"].startswith("widened")


# -- hard limits (pipeline.search.limits) ---------------------------------------------------------

COARSE = {"l2_lambda": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
          "eta_min": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
          "eta_max": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
          "depth": {"type": "int", "low": 1, "high": 4, "log": False, "step": 1},
          "width": {"type": "int", "low": 16, "high": 512, "log": True, "step": 1},
          "activation": {"type": "categorical", "choices": ["relu", "tanh"]}}


def test_built_in_limits_come_from_the_setting_and_the_scale():
    assert natural_limit("depth", "int", False) == {"low": 0, "high": None}  # TrainConfig: ge=0
    assert natural_limit("width", "int", True) == {"low": 1, "high": None}  # ge=1, log: >= 1
    assert natural_limit("dropout", "float", False) == {"low": 0.0,  # ge=0, lt=1: just below 1
                                                         "high": math.nextafter(1.0, 0.0)}
    log_low = natural_limit("l2_lambda", "float", True)["low"]  # ge=0, log: above 0
    assert log_low > 0 and log_low == math.nextafter(0.0, 1.0)


def test_derived_limits_tighten_the_built_in_ones_with_the_study_files():
    limits, problems = derived_limits(COARSE, {"depth": Limit(high=8), "l2_lambda": Limit(
        low=1e-7, high=1.0)}, space={}, fixed={"cycles": 5})
    assert problems == []
    assert set(limits) == {"l2_lambda", "eta_min", "eta_max", "depth", "width"}  # no categorical
    assert limits["depth"] == {"low": 0, "high": 8} and type(limits["depth"]["high"]) is int
    assert limits["l2_lambda"] == {"low": 1e-7, "high": 1.0}
    assert limits["width"] == {"low": 1, "high": None}
    # eta_min and eta_max meet at 1e-3 in the parent: neither widens past it
    assert limits["eta_min"]["high"] == limits["eta_max"]["low"] == 1e-3


def test_an_ordered_pair_with_a_gap_stops_at_its_middle_or_at_a_fixed_partner():
    parent = {**COARSE, "eta_min": {**COARSE["eta_min"], "high": 1e-4},
              "eta_max": {**COARSE["eta_max"], "low": 1e-2}}
    limits, _ = derived_limits(parent, {}, space={}, fixed={})
    assert limits["eta_min"]["high"] == limits["eta_max"]["low"] == pytest.approx(1e-3)
    limits, _ = derived_limits(parent, {}, space={}, fixed={"eta_max": 0.05})
    assert limits["eta_min"]["high"] == 0.05 and "eta_max" not in limits
    own = {"eta_min": FloatParam(type="float", low=1e-6, high=2e-3, log=True)}
    limits, _ = derived_limits(parent, {}, space=own, fixed={})
    assert limits["eta_max"]["low"] == 2e-3 and "eta_min" not in limits


def test_derived_limit_problems_only_the_parents_space_reveals():
    declared = {"l2_lambda": Limit(low=0.0), "dropout": Limit(high=0.5),
                "activation": Limit(high=1)}
    _, problems = derived_limits(COARSE, declared, space={}, fixed={})
    assert problems == [
        "limits.l2_lambda.low: l2_lambda must be > 0 on a log scale (got 0)",
        "limits.dropout: dropout is not searched (neither in space nor in the parent's space)",
        "limits.activation: limits apply to float and int parameters; the parent searches "
        "activation as a categorical"]


def test_limit_problems_of_a_study_file():
    space = {"depth": IntParam(type="int", low=1, high=10),
             "l2_lambda": FloatParam(type="float", low=1e-5, high=1e-1, log=True)}
    limits = {"depth": Limit(low=-1, high=8.5), "l2_lambda": Limit(low=0.0),
              "dropout": Limit(high=1.0), "cycles": Limit(high=3), "optimizer": Limit(low=1),
              "bogus": Limit(low=1)}
    assert limit_problems(limits, space, {"cycles": 5}, has_parent=True) == [
        "limits.depth.low: depth must be >= 0 (got -1)",
        "limits.depth.high: 8.5 is not a whole number (depth is an integer)",
        "space.depth: high (10) lies outside limits.depth.high (8.5)",
        "limits.l2_lambda.low: l2_lambda must be > 0 on a log scale (got 0)",
        "limits.dropout.high: dropout must be < 1 (got 1)",
        "limits.cycles: cycles is fixed, not searched; drop the limit",
        "limits.optimizer: limits apply to float and int parameters; optimizer is not searched "
        "as one",
        "limits.bogus: not a training setting"]
    assert limit_problems({"dropout": Limit(high=0.5)}, {}, {}, has_parent=False) == [
        "limits.dropout: dropout is not searched (not in space)"]


def test_a_limit_needs_a_side_and_an_order():
    with pytest.raises(ValueError, match="give low, high or both"):
        Limit()
    with pytest.raises(ValueError, match=r"low \(9\) must be below high \(8\)"):
        Limit(low=9, high=8)


# -- clipping seeds into the new space ------------------------------------------------------------


def test_clip_params_moves_values_into_the_space_and_drops_unknown_keys():
    space = {"a": {"type": "float", "low": 0.0, "high": 1.0, "log": False},
             "b": {"type": "int", "low": 2, "high": 4, "log": False, "step": 1},
             "c": {"type": "categorical", "choices": ["x", "y"]},
             "d": {"type": "float", "low": 0.0, "high": 1.0, "log": False}}
    params = {"a": 1.5, "b": 0, "c": "z", "e": 7}
    assert clip_params(params, space) == {"a": 1.0, "b": 2, "c": "x"}
    assert clip_params({"a": -3.0, "b": 9, "c": "y"}, space) == {"a": 0.0, "b": 4, "c": "y"}
    assert clip_params({"a": 0.25, "b": 3.4}, space) == {"a": 0.25, "b": 3}
    assert type(clip_params({"b": 3.0}, space)["b"]) is int


# -- selecting the best trials --------------------------------------------------------------------

TRIALS = [
    {"number": 0, "value": 0.50, "params": {}},
    {"number": 1, "value": None, "params": {}},  # failed or pruned: no value
    {"number": 2, "value": 0.90, "params": {}},
    {"number": 3, "value": 0.70, "params": {}},
    {"number": 4, "value": 0.90, "params": {}},  # ties with 2: the earlier trial comes first
    {"number": 5, "value": float("nan"), "params": {}},
    {"number": 6, "value": 0.10, "params": {}},
    {"number": 7, "value": 0.60, "params": {}},
    {"number": 8, "value": 0.80, "params": {}},
    {"number": 9, "value": 0.30, "params": {}},
    {"number": 10, "value": 0.20, "params": {}},
]


def numbers(trials):
    return [t["number"] for t in trials]


def test_select_top_k_maximize_best_first_ties_by_number():
    assert numbers(select_top(TRIALS, "maximize", top_k=3)) == [2, 4, 8]


def test_select_top_k_minimize():
    assert numbers(select_top(TRIALS, "minimize", top_k=3)) == [6, 10, 9]


def test_select_top_fraction_of_the_completed_trials():
    # 9 trials have a finite value: 0.34 of 9 = 3.06 -> 3
    assert numbers(select_top(TRIALS, "maximize", top_fraction=0.34)) == [2, 4, 8]


def test_select_top_fraction_keeps_at_least_two():
    assert numbers(select_top(TRIALS, "maximize", top_fraction=0.01)) == [2, 4]


def test_select_top_defaults_to_five_and_never_more_than_there_are():
    assert numbers(select_top(TRIALS, "maximize")) == [2, 4, 8, 3, 7]
    assert numbers(select_top(TRIALS[:3], "maximize", top_k=10)) == [2, 0]


@pytest.mark.parametrize("trials", [
    [],
    [{"number": 0, "value": None, "params": {"x": 1.0}}],
    [{"number": 0, "value": float("nan"), "params": {}},
     {"number": 1, "value": float("inf"), "params": {}}],
])
def test_no_completed_trial_is_a_narrowing_error(trials):
    with pytest.raises(NarrowingError, match="no completed trial"):
        select_top(trials, "maximize", top_k=3)
    with pytest.raises(NarrowingError):
        narrow_space({"x": LIN}, trials, "maximize")


# -- the whole record -----------------------------------------------------------------------------


PARENT = {"l2": LOG, "width": {"type": "int", "low": 16, "high": 512, "log": True, "step": 1},
          "act": CAT, "cycles": {"type": "int", "low": 1, "high": 4, "log": False, "step": 1}}
PARENT_TRIALS = [
    {"number": 0, "value": 0.95, "params": {"l2": 1e-4, "width": 64, "act": "relu", "cycles": 2}},
    {"number": 1, "value": 0.40, "params": {"l2": 5e-2, "width": 16, "act": "tanh", "cycles": 1}},
    {"number": 2, "value": None, "params": {"l2": 1e-2, "width": 32, "act": "sigmoid",
                                            "cycles": 3}},
    {"number": 3, "value": 0.97, "params": {"l2": 1e-3, "width": 128, "act": "relu", "cycles": 4}},
    {"number": 4, "value": 0.90, "params": {"l2": 2e-5, "width": 512, "act": "tanh", "cycles": 4}},
]


def test_narrow_space_record():
    record = narrow_space(PARENT, PARENT_TRIALS, "maximize", top_k=2, margin=0.25,
                          boundary_fraction=0.1, enqueue=1, keep=["l2", "width", "act"])
    assert record["trials"] == [3, 0]
    assert record["values"] == [0.97, 0.95]
    assert record["k"] == 2
    assert set(record["space"]) == set(record["params"]) == {"l2", "width", "act"}  # no cycles
    span = math.log(1e-3) - math.log(1e-4)
    assert bounds(record["space"]["l2"]) == pytest.approx(
        (math.exp(math.log(1e-4) - 0.25 * span), math.exp(math.log(1e-3) + 0.25 * span)))
    # width 64..128 in log space: 64 / 2**0.25 = 53.8 -> 53, 128 * 2**0.25 = 152.2 -> 153
    assert bounds(record["space"]["width"]) == (53, 153)
    assert record["space"]["act"]["choices"] == ["relu"]
    assert record["params"]["l2"]["old"] == LOG
    assert record["params"]["l2"]["new"] == record["space"]["l2"]
    assert record["params"]["width"]["best_values"] == [128, 64]
    # the best configuration, restricted to the new space (nothing to clip: it lies inside)
    assert record["seeds"] == [{"l2": 1e-3, "width": 128, "act": "relu"}]
    assert record["boundary_flags"] == {}
    assert record["rule"] == {"top_k": 2, "top_fraction": None, "margin": 0.25,
                              "boundary_fraction": 0.1, "direction": "maximize"}


def test_narrow_space_flags_parameters_crowding_an_edge_and_widens_past_it():
    record = narrow_space(PARENT, PARENT_TRIALS, "maximize", top_k=3, boundary_fraction=0.1)
    # best three: 3, 0, 4 -> cycles 4, 2, 4: two of three at the top edge (within 0.3 of 4)
    assert record["params"]["cycles"]["boundary"] == "high"
    assert record["boundary_flags"] == {"cycles": "high"}
    # span 2, padding 0.5: the low side narrows (1.5 -> 1, the parent's edge), the high side
    # goes past the parent's 4 by the padding (4.5 -> 5)
    assert bounds(record["space"]["cycles"]) == (1, 5)
    assert record["params"]["cycles"]["edges"] == {
        "high": {"change": "widened", "old": 4, "new": 5}}
    assert all(r["edges"] == {} for n, r in record["params"].items() if n != "cycles")


def test_narrow_space_minimize_picks_the_lowest_values():
    record = narrow_space(PARENT, PARENT_TRIALS, "minimize", top_k=1, enqueue=5)
    assert record["trials"] == [1]
    assert record["seeds"] == [PARENT_TRIALS[1]["params"]]  # enqueue is capped by top_k
    assert record["space"]["act"]["choices"] == ["tanh"]


def test_narrow_space_keeps_a_parameter_no_best_trial_set():
    trials = [{"number": 0, "value": 1.0, "params": {"l2": 1e-3}}]
    record = narrow_space({"l2": LOG, "act": CAT}, trials, "maximize")
    assert record["space"]["act"] == CAT
    assert record["params"]["act"]["best_values"] == []
