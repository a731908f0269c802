"""Run configuration: strict keys and types, and one set of defaults shared with pyproject."""

import tomllib

import pytest
from conftest import REPO_ROOT

from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError


def test_pyproject_app_config_equals_runconfig_defaults():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()


def test_round_trip_through_kebab_mapping():
    cfg = RunConfig(num_rounds=3, head="mlp", noise_multiplier=1.5, non_private=True)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_unknown_key_names_the_key_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key `num-round`; did you mean `num-rounds`\?"):
        RunConfig.from_mapping({"num-round": 3})
    with pytest.raises(ConfigError, match=r"`num-sites`; the number of sites is not a run-config key: `fedtl simu"):
        RunConfig.from_mapping({"num-sites": 3})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-rounds": "3"}, r"`num-rounds` must be an integer, got '3'"),
        ({"num-rounds": 0}, r"`num-rounds` must be >= 1, got 0"),
        ({"target-epsilon": -1.0}, r"`target-epsilon` must be > 0.0, got -1.0"),
        ({"target-delta": 1.0}, r"`target-delta` must be > 0.0 and < 1.0, got 1.0"),
        ({"head": "transformer"}, r"`head` must be one of linear, mlp, projected; got 'transformer'"),
        ({"noise-multiplier": "lots"}, r"`noise-multiplier` must be a number >= 0 or \"auto\", got 'lots'"),
        ({"non-private": 1}, r"`non-private` must be true or false, got 1"),
        ({"strategy": "fedsgd"}, r"`strategy` must be one of fedavg, fedprox, fedadam; got 'fedsgd'"),
    ],
)
def test_bad_values_name_the_key_and_the_value(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_integers_are_accepted_where_floats_are_expected():
    assert RunConfig.from_mapping({"target-epsilon": 4, "noise-multiplier": 1}).noise_multiplier == 1.0
