"""TrainConfig: defaults, immutability, and validation that reports every problem at once."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, TrainConfig, make_train_config


def test_defaults_are_valid_and_match_an_empty_settings_dict():
    cfg = TrainConfig()
    assert make_train_config({}) == cfg
    assert cfg.dataset == "digits"  # the default must not need a download
    assert cfg.eta_min < cfg.eta_max


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises((ValueError, AttributeError)):  # pydantic: ValidationError "frozen"
        cfg.width = 3
    assert cfg.width == TrainConfig().width


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError) as info:
        make_train_config({"widht": 32})
    assert "widht" in str(info.value)
    assert "unknown key" in str(info.value)


def test_every_problem_is_listed_in_one_error():
    with pytest.raises(ConfigError) as info:
        make_train_config({"width": 0, "depth": -1, "eta_min": 0.5, "eta_max": 0.1})
    message = str(info.value)
    assert "3 problem(s)" in message
    for field in ("width", "depth", "eta_min"):
        assert field in message
    lines = [line for line in message.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 3


def test_cross_field_rule_alone_is_a_config_error():
    with pytest.raises(ConfigError, match="eta_min"):
        make_train_config({"eta_min": 0.2, "eta_max": 0.2})


def test_eta_order_only_matters_for_the_cyclical_schedule():
    cfg = make_train_config({"schedule": "constant", "eta_min": 0.5, "eta_max": 0.1})
    assert cfg.schedule == "constant"


def test_freeze_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="pretrained"):
        make_train_config({"freeze": "features"})


def test_unknown_choice_is_rejected():
    with pytest.raises(ConfigError, match="optimizer"):
        make_train_config({"optimizer": "sgdd"})


@pytest.mark.parametrize("step_size_epochs, cycles", [(1, 1), (2, 1), (3, 2), (1, 4)])
def test_cyclical_epochs_are_two_half_cycles_per_cycle(step_size_epochs, cycles):
    cfg = TrainConfig(schedule="cyclical", step_size_epochs=step_size_epochs, cycles=cycles,
                      epochs=99)
    assert cfg.n_epochs == 2 * step_size_epochs * cycles


def test_constant_schedule_runs_for_epochs():
    assert TrainConfig(schedule="constant", epochs=7, cycles=5).n_epochs == 7
