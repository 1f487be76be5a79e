"""Which rate a node samples at: declared, from the public partition plan, or the bound."""

from __future__ import annotations

import logging

import pytest

from dpfpl_app.config import ConfigError, RunConfig
from dpfpl_app.federation.node_rate import RateSource, node_rate, planned_sizes
from dpfpl_app.privacy.dp_channel import SampleRateError, plan_for
from dpfpl_app.privacy.sample_rate import rate_mismatch
from dpfpl_app.service.cli import main as dpfpl

CFG = RunConfig.from_flower({"batch-size": 32, "max-sample-rate": 0.5})


def _rate(node_config: dict, cfg: RunConfig = CFG):  # noqa: ANN202 - a NodeRate
    return node_rate(cfg, plan_for(cfg), node_config, partition_id=1, num_partitions=4)


def test_a_declared_rate_is_used_as_declared() -> None:
    rate = _rate({"sample-rate": 0.02, "dataset": "imagefolder", "data-dir": "/x"})
    assert (rate.rate, rate.source) == (0.02, RateSource.DECLARED)


def test_a_declared_rate_above_the_bound_is_refused_naming_both_keys_and_the_fix() -> None:
    with pytest.raises(SampleRateError, match=r"sample-rate.*max-sample-rate=0\.5.*lower"):
        _rate({"sample-rate": 0.8})
    with pytest.raises(ConfigError, match="sample-rate='fast' is not a number"):
        _rate({"sample-rate": "fast"})


def test_a_public_partition_declares_the_plans_rate_whatever_its_data() -> None:
    # the simulation's share of a public dataset: B / the planned size, capped at the bound
    rate = _rate({})
    size = planned_sizes(CFG, 4)[1]
    assert rate.source is RateSource.PARTITION_PLAN
    assert rate.rate == pytest.approx(min(0.5, 32 / size))


def test_a_node_with_its_own_data_and_no_declaration_samples_at_the_bound() -> None:
    rate = _rate({"data-dir": "/srv/images"})
    assert (rate.rate, rate.source) == (0.5, RateSource.BOUND)


def test_a_mismatch_between_declared_rate_and_data_size_is_described() -> None:
    assert rate_mismatch(0.08, 32, 400) is None
    damped = rate_mismatch(0.01, 32, 400)
    assert damped is not None and "damped" in damped and "0.08" in damped
    assert "more privacy" in (rate_mismatch(0.5, 32, 400) or "")


def test_sample_rate_command_prints_the_matching_rate(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        assert dpfpl(["sample-rate", "--num-train", "400", "--batch-size", "32"]) == 0
    assert capsys.readouterr().out.startswith("0.08 ")
    assert dpfpl(["sample-rate", "--num-partitions", "4", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    rates = [min(1.0, 32 / n) for n in planned_sizes(CFG, 4)]
    assert f"max {max(rates):.6g}: use max-sample-rate={max(rates):.6g}" in out
