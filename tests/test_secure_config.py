"""Run-config rules of ``aggregation = "secure"``: each refusal names the key and the fix."""

from __future__ import annotations

import pytest

from dpfpl_app.config import Aggregation, ConfigError, RunConfig
from dpfpl_app.privacy.dp_channel import HONEST_SERVER, SECURE_SERVER, plan_for


def _cfg(**overrides: object) -> RunConfig:
    return RunConfig.from_flower({"aggregation": "secure", "min-nodes": 3, **overrides})


def test_plain_stays_the_default() -> None:
    assert RunConfig().aggregation is Aggregation.PLAIN
    assert plan_for(RunConfig()).server_view == HONEST_SERVER


@pytest.mark.parametrize("method", ["dpfpl", "dplora", "fedpgp", "fedotp", "promptfl"])
def test_secure_accepts_every_method_with_a_global_prompt(method: str) -> None:
    plan = plan_for(_cfg(method=method, **{"num-server-rounds": 5}))
    assert plan.secure and plan.server_view == SECURE_SERVER
    assert "only the noised SUM" in plan.server_view


def test_secure_without_dp_is_plain_secagg() -> None:
    plan = plan_for(_cfg(**{"dp-mode": "off", "local-steps": 3}))
    assert plan.secure and plan.z_global == 0.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"method": "local"}, "shares no global prompt"),
        ({"method": "zeroshot"}, "shares no global prompt"),
        ({"dp-mode": "paper"}, "needs dp-mode='per-sample'"),
        ({"min-nodes": 2}, "min-nodes >= 3"),
        ({"local-steps": 2}, "needs local-steps=1"),
        ({"accountant": "prv"}, "set accountant='rdp'"),
    ],
)
def test_secure_refuses_what_it_cannot_protect_or_account(
    overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(**overrides)
