"""RunConfig.from_flower: every validation rule names the key and what is allowed."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pydantic
import pytest
import tomllib

from dpfpl_app.config import ConfigError, DPMode, Method, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_config() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_are_a_valid_config() -> None:
    # Prepare
    raw = _pyproject_config()

    # Execute
    cfg = RunConfig.from_flower(raw)

    # Assert: every key was read into its field (nothing silently fell back to a default)
    assert cfg.to_flower() == raw


def test_empty_config_uses_field_defaults() -> None:
    cfg = RunConfig.from_flower({})
    assert cfg.method is Method.DPFPL and cfg.dp_mode is DPMode.PER_SAMPLE


def test_to_flower_round_trip_and_value_types() -> None:
    # Prepare
    cfg = RunConfig.from_flower({"method": "fedpgp", "rank": 2, "n-ctx": 4, "dp-mode": "off"})

    # Execute
    flat = cfg.to_flower()
    again = RunConfig.from_flower(flat)

    # Assert: a flat dict of Flower's value types that validates back to the same config
    assert again == cfg
    assert all(isinstance(v, (int, float, bool, str)) for v in flat.values())
    assert flat["method"] == "fedpgp" and flat["n-ctx"] == 4


def test_from_flower_does_not_mutate_the_callers_dict_and_result_is_frozen() -> None:
    # Prepare
    raw = {"rank": 2, "n-ctx": 4}
    before = copy.deepcopy(raw)

    # Execute
    cfg = RunConfig.from_flower(raw)

    # Assert
    assert raw == before
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.rank = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "dpfp"}, r"method='dpfp': Input should be 'dpfpl', 'dplora', .*'zeroshot'"),
        ({"method": 3}, r"method=3: Input should be 'dpfpl'"),
        ({"dp-mode": "full"}, r"dp-mode='full': Input should be 'off', 'paper' or 'per-sample'"),
        ({"rank": 8, "n-ctx": 4}, r"rank=8 exceeds n-ctx=4.*rank <= min\(n-ctx"),
        ({"rank": 0}, r"rank=0: Input should be greater than or equal to 1"),
        ({"n-ctx": 0}, r"n-ctx=0: Input should be greater than or equal to 1"),
        ({"n-ctx": -3}, r"n-ctx=-3: Input should be greater than or equal to 1"),
        ({"n-ctx": 61}, r"n-ctx=61: Input should be less than or equal to 60"),
        ({"epsilon": 0}, r"epsilon=0: Input should be greater than 0"),
        ({"epsilon": -1.0}, r"epsilon=-1\.0: Input should be greater than 0"),
        ({"global-share": 1.0}, r"global-share=1\.0: Input should be less than 1"),
        ({"global-share": 0.0}, r"global-share=0\.0: Input should be greater than 0"),
        ({"max-sample-rate": 1.5}, r"max-sample-rate=1\.5: Input should be less than or equal"),
        ({"delta": 1.0}, r"delta=1\.0: Input should be less than 1"),
        ({"clip-norm": 0.0}, r"clip-norm=0\.0: Input should be greater than 0"),
        ({"momentum": 1.0}, r"momentum=1\.0: Input should be less than 1"),
        ({"learning-rate": 0.1}, r"learning-rate: unknown key; known keys: .*lr-global, lr-local"),
        ({"rank": "eight"}, r"rank='eight': Input should be a valid integer"),
        ({"rank": 2.5}, r"rank=2\.5: Input should be a valid integer"),
        ({"epsilon": "small"}, r"epsilon='small': Input should be a valid number"),
        ({"reproducible-noise": "maybe"}, r"reproducible-noise='maybe': Input should be a valid"),
        ({"model": ""}, r"model='': String should have at least 1 character"),
    ],
)
def test_bad_value_raises_config_error_naming_key_and_allowed_range(
    raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(raw)


def test_every_bad_key_is_reported_in_one_message() -> None:
    # Prepare
    raw = {"n-ctx": 0, "epsilon": 0, "batchsize": 32}

    # Execute
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower(raw)

    # Assert
    text = str(info.value)
    assert "n-ctx=0" in text and "epsilon=0" in text and "batchsize: unknown key" in text
    assert "--run-config" in text  # says where to fix it


@pytest.mark.parametrize("raw", [{"rank": True}, {"epsilon": True}])
def test_bool_for_a_numeric_key_is_a_wrong_type(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(raw))):
        RunConfig.from_flower(raw)


def test_rank_above_n_ctx_is_allowed_for_full_rank_methods() -> None:
    cfg = RunConfig.from_flower({"method": "fedotp", "rank": 8, "n-ctx": 4})
    assert cfg.rank == 8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dp-mode": "paper"}, "not a formal sample-level guarantee"),
        ({"reproducible-noise": True}, "anyone who knows the seed can subtract it"),
    ],
)
def test_legal_but_weaker_privacy_settings_warn(raw: dict[str, Any], message: str) -> None:
    with pytest.warns(UserWarning, match=message):
        RunConfig.from_flower(raw)


def test_safe_defaults_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunConfig.from_flower({"reproducible-noise": True, "dp-mode": "off"})
        RunConfig.from_flower({})


@pytest.mark.parametrize(
    ("raw", "dp_on"),
    [
        ({"dp-mode": "per-sample"}, True),
        ({"dp-mode": "paper"}, True),
        ({"dp-mode": "off"}, False),
        ({"dp-mode": "per-sample", "method": "zeroshot"}, False),
    ],
)
def test_dp_on_only_when_something_is_trained_with_dp(raw: dict[str, Any], dp_on: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert RunConfig.from_flower(raw).dp_on is dp_on


def test_a_cross_field_error_names_its_keys_without_dumping_the_config() -> None:
    # Prepare: the whole config, as Flower passes it
    raw = {**RunConfig().to_flower(), "rank": 32}

    # Execute
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower(raw)

    # Assert: one short message that names the two keys and none of the others
    text = str(info.value)
    assert "rank=32 exceeds n-ctx=16" in text
    assert "zeroshot-template" not in text and "Value error" not in text
    assert len(text) < 300
