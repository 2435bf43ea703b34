"""Coarse -> fine narrowing on literal tables (pipeline.narrow is pure: no Optuna, no MLflow).

Every expected interval is computed by hand here, from the rule in the module docstring: the span
of the best values, padded by margin x span on each side (in log space for log parameters),
clipped to the parent range, integers rounded outward.
"""

from __future__ import annotations

import math
import random

import pytest

from pipeline.search.narrow import (
    NarrowingError,
    boundary_flag,
    clip_params,
    narrow_param,
    narrow_space,
    select_top,
)

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


def test_narrow_space_flags_parameters_crowding_an_edge():
    record = narrow_space(PARENT, PARENT_TRIALS, "maximize", top_k=3, boundary_fraction=0.1)
    # best three: 3, 0, 4 -> cycles 4, 2, 4: two of three at the top edge (within 0.3 of 4)
    assert record["params"]["cycles"]["boundary"] == "high"
    assert record["boundary_flags"] == {"cycles": "high"}


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
