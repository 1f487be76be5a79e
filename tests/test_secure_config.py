"""Run-config rules of ``aggregation = "secure"``: each refusal names the key and the fix."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from dpfpl_app.config import Aggregation, ConfigError, RunConfig
from dpfpl_app.privacy.dp_channel import HONEST_SERVER, SECURE_SERVER, plan_for


def _cfg(**overrides: object) -> RunConfig:
    return RunConfig.from_flower({"aggregation": "secure", "min-nodes": 3, **overrides})


def test_auto_is_the_default_and_plans_as_plain_until_resolved() -> None:
    assert RunConfig().aggregation is Aggregation.AUTO
    assert plan_for(RunConfig()).server_view == HONEST_SERVER
    assert plan_for(RunConfig()).aggregation is Aggregation.PLAIN


# --- auto: secure against real SuperNodes, plain in simulation -------------------------
def test_auto_is_secure_on_flowers_deployment_grid_and_plain_elsewhere() -> None:
    from flwr.superlink.grid import HttpGrid, InMemoryGrid

    from dpfpl_app.federation.server_run import aggregation_mode

    deployed = HttpGrid("127.0.0.1:1", insecure=True, token="t")  # never connects
    assert aggregation_mode(deployed) is Aggregation.SECURE
    assert aggregation_mode(InMemoryGrid.__new__(InMemoryGrid)) is Aggregation.PLAIN


def test_auto_resolves_to_secure_with_its_own_noise_plan() -> None:
    cfg = RunConfig.from_flower({"min-nodes": 3}).resolve_aggregation(Aggregation.SECURE)

    assert cfg.aggregation is Aggregation.SECURE and plan_for(cfg).secure
    assert plan_for(cfg).z_global > plan_for(RunConfig.from_flower({"min-nodes": 3})).z_global


def test_auto_stays_plain_for_methods_that_share_nothing() -> None:
    cfg = RunConfig.from_flower({"method": "local", "min-nodes": 3})
    assert cfg.resolve_aggregation(Aggregation.SECURE).aggregation is Aggregation.PLAIN


def test_auto_refuses_a_deployment_secure_aggregation_cannot_protect() -> None:
    cfg = RunConfig.from_flower({"min-nodes": 3, "dp-mode": "paper"})

    with pytest.raises(ConfigError) as err:
        cfg.resolve_aggregation(Aggregation.SECURE)

    text = str(err.value)
    assert "aggregation='auto' runs secure aggregation" in text
    assert "needs dp-mode='per-sample'" in text and "aggregation='plain'" in text


@pytest.mark.parametrize(
    ("configured", "stated"),
    [("plain", Aggregation.SECURE), ("secure", Aggregation.PLAIN)],
)
def test_a_message_that_contradicts_an_explicit_mode_is_refused(
    configured: str, stated: Aggregation
) -> None:
    cfg = RunConfig.from_flower({"aggregation": configured, "min-nodes": 3})
    with pytest.raises(ConfigError, match="disagree on the aggregation"):
        cfg.resolve_aggregation(stated)


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


# --- the node's side: the mode comes from the message; the operator can require secure --
def _context(node_config: dict[str, object], **run: object) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
        run_config=RunConfig(**run).to_flower(),
    )  # fmt: skip


def test_a_client_plans_the_mode_its_message_states() -> None:
    from client_app import run_config

    context = _context({}, min_nodes=3)
    assert run_config(context, Aggregation.SECURE).aggregation is Aggregation.SECURE
    assert run_config(context, Aggregation.PLAIN).aggregation is Aggregation.PLAIN


def test_a_node_that_requires_secure_aggregation_refuses_plain_rounds() -> None:
    from client_app import REQUIRE_SECURE, run_config

    strict = _context({REQUIRE_SECURE: True}, min_nodes=3)
    with pytest.raises(ConfigError, match="requires secure aggregation"):
        run_config(strict, Aggregation.PLAIN)
    assert run_config(strict, Aggregation.SECURE).aggregation is Aggregation.SECURE
    # nothing leaves a node whose method shares no global prompt
    local = _context({REQUIRE_SECURE: True}, min_nodes=3, method="local")
    assert run_config(local, Aggregation.PLAIN).aggregation is Aggregation.PLAIN


def test_a_secure_stage_for_a_method_without_global_prompt_is_refused() -> None:
    from client_app import run_config

    with pytest.raises(ConfigError, match="shares no global prompt"):
        run_config(_context({}, min_nodes=3, method="local"), Aggregation.SECURE)


def test_a_misspelt_node_policy_is_refused_not_read_as_false() -> None:
    from client_app import REQUIRE_SECURE, run_config

    with pytest.raises(ConfigError, match="use true or false"):
        run_config(_context({REQUIRE_SECURE: "yes"}, min_nodes=3), Aggregation.PLAIN)
