"""DPFPLStrategy: aggregation, refusals, noise, accounting, node waiting, checkpoints."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable

import pytest
import torch
from flower_harness import InProcessGrid, make_reply, run_strategy
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant

from dpfpl_app.config import RunConfig
from dpfpl_app.federation import node_wait, wire
from dpfpl_app.federation.strategy import DPFPLStrategy
from dpfpl_app.privacy.accounting import RDP_ORDERS
from dpfpl_app.privacy.dp_channel import ChannelPlan, plan_for

SHAPE = (4, 8)
LR = 0.5
CLIP = 1.0
BATCH = 4
GOOD_A, GOOD_B, BAD = 1_000_011, 1_000_012, 1_000_099


def _prompt(shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, shape[0] * shape[1]).reshape(shape)


def _grad(scale: float, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    """A gradient of norm ``scale`` (below CLIP for scale < 1)."""
    g = torch.arange(1.0, 1.0 + shape[0] * shape[1]).reshape(shape)
    return g / g.norm() * scale


def _plan(**config: object) -> ChannelPlan:
    """The channel plan of a run config with this file's C and B."""
    values: dict[str, object] = {"clip-norm": CLIP, "batch-size": BATCH, "dp-mode": "off"}
    values.update(config)
    return plan_for(RunConfig.from_flower(values))


def _strategy(**overrides: object) -> DPFPLStrategy:
    kwargs: dict[str, object] = {
        "initial_prompt": _prompt(),
        "server_lr": LR,
        "channel": _plan(),
        "min_nodes": 1,
        "node_wait_timeout": 1.0,
        "seed": 0,
    }
    kwargs.update(overrides)
    return DPFPLStrategy(**kwargs)  # type: ignore[arg-type]


RATE = 0.5  # the default max-sample-rate: a node declaring the bound


def _train_content(
    grad: torch.Tensor, *, dp_on: bool = False, loss: float = 1.0, rate: float = RATE
) -> RecordDict:
    return wire.train_reply_content(grad=grad, train_loss=loss, dp_on=dp_on, sample_rate=rate)


def _reply(
    node: int, grad: torch.Tensor, *, dp_on: bool = False, loss: float = 1.0, rate: float = RATE
) -> Message:
    return make_reply(_train_content(grad, dp_on=dp_on, loss=loss, rate=rate), src_node_id=node)


def _prompt_of(arrays: ArrayRecord | None) -> torch.Tensor:
    assert arrays is not None
    return wire.read_global_prompt(arrays)


# --- aggregation ------------------------------------------------------------------------
def test_aggregate_is_prompt_minus_lr_times_mean_with_noise_off() -> None:
    # Prepare
    g_a, g_b = _grad(0.3), -_grad(0.8).flip(0)
    strategy = _strategy()

    # Execute
    arrays, metrics = strategy.aggregate_train(1, [_reply(GOOD_A, g_a), _reply(GOOD_B, g_b)])

    # Assert
    expected = _prompt() - LR * (g_a + g_b) / 2
    torch.testing.assert_close(_prompt_of(arrays), expected, rtol=0, atol=1e-7)
    assert metrics is not None
    assert metrics[wire.NOISE_STD] == 0.0 and metrics[wire.ACCEPTED] == 2
    assert metrics[wire.UPDATE_NORM] == pytest.approx(float(((g_a + g_b) / 2).norm()), rel=1e-6)
    assert metrics[wire.EPSILON] == math.inf
    assert metrics[wire.TRAIN_LOSS] == 1.0  # without DP the loss may be shown


def test_server_reclips_a_huge_gradient_to_clip_norm(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    g_small, g_huge = _grad(0.5), _grad(1.0e6).flip(0)
    strategy = _strategy()

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(
            1, [_reply(GOOD_A, g_small), _reply(BAD, g_huge)]
        )

    # Assert: the huge reply counts as a gradient of norm CLIP in the same direction; the
    # log names the node but no norm (a statistic of its batch), nor do the metrics
    expected = _prompt() - LR * (g_small + g_huge / g_huge.norm() * CLIP) / 2
    torch.testing.assert_close(_prompt_of(arrays), expected, rtol=0, atol=1e-6)
    assert metrics is not None and set(metrics) == {
        wire.ACCEPTED, wire.REJECTED, wire.BYTES_RECEIVED, wire.EPSILON, wire.NOISE_STD,
        wire.UPDATE_NORM, wire.TRAIN_LOSS,
    }
    flagged = [r.getMessage() for r in caplog.records if str(BAD) in r.getMessage()]
    assert flagged and all("re-clipped" in m and "1e+06" not in m for m in flagged)


def test_zero_gradient_is_accepted_without_dividing_by_zero() -> None:
    arrays, _ = _strategy().aggregate_train(1, [_reply(GOOD_A, torch.zeros(SHAPE))])
    torch.testing.assert_close(_prompt_of(arrays), _prompt(), rtol=0, atol=0)


# --- refusals ---------------------------------------------------------------------------
def _content_with(arrays: dict[str, torch.Tensor], **metric_overrides: object) -> RecordDict:
    metrics: dict[str, object] = {wire.TRAIN_LOSS: 1.0}
    metrics.update(metric_overrides)
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return RecordDict(
        {
            wire.ARRAYS_RECORD: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            wire.METRICS_RECORD: MetricRecord(metrics),  # type: ignore[arg-type]
        }
    )


def _extra_record(name: str, record: ArrayRecord | ConfigRecord) -> RecordDict:
    content = _train_content(_grad(0.1))
    content[name] = record
    return content


G = wire.GLOBAL_PROMPT_GRAD
NAN_GRAD = _grad(0.1).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.nan))
INF_GRAD = _grad(0.1).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(math.inf))
BAD_REPLIES: dict[str, tuple[Callable[[], RecordDict | Error], str]] = {
    "missing key": (lambda: _content_with({wire.GLOBAL_PROMPT: _grad(0.1)}), "missing array"),
    "extra local-prompt": (
        lambda: _content_with({G: _grad(0.1), "local-prompt": _grad(0.1)}),
        "unexpected array keys ['local-prompt']",
    ),
    "wrong shape": (lambda: _content_with({G: torch.zeros(4, 9)}), "shape (4, 9)"),
    "wrong dtype": (lambda: _content_with({G: _grad(0.1).double()}), "dtype float64"),
    "nan": (lambda: _content_with({G: NAN_GRAD}), "NaN or Inf"),
    "inf": (lambda: _content_with({G: INF_GRAD}), "NaN or Inf"),
    "error message": (lambda: Error(code=2, reason="ClientApp crashed"), "error reply (code 2)"),
    "missing train-loss": (
        lambda: _content_with({G: _grad(0.1)}, **{wire.TRAIN_LOSS: None}),
        "train metrics [], expected exactly ['train-loss']",
    ),
    "extra sample-rate": (
        lambda: _content_with({G: _grad(0.1)}, **{"sample-rate": 0.1}),
        "expected exactly ['train-loss']",
    ),
    "nan loss": (
        lambda: _content_with({G: _grad(0.1)}, **{wire.TRAIN_LOSS: math.nan}),
        "'train-loss' must be a number",
    ),
    "list metric": (
        lambda: _content_with({G: _grad(0.1)}, **{wire.TRAIN_LOSS: [0.1, 0.2]}),
        "list-valued metrics ['train-loss']",
    ),
    "second ArrayRecord": (
        lambda: _extra_record("local", ArrayRecord({"p": Array(_grad(0.1))})),
        "unexpected records ['local']",
    ),
    "extra ConfigRecord": (
        lambda: _extra_record("smuggled", ConfigRecord({"bytes": b"x"})),
        "unexpected records ['smuggled']",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_REPLIES))
def test_bad_reply_is_excluded_and_logged_with_node_and_reason(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    build, reason = BAD_REPLIES[kind]
    g_a, g_b = _grad(0.3), _grad(0.6).flip(1)
    replies = [_reply(GOOD_A, g_a), make_reply(build(), src_node_id=BAD), _reply(GOOD_B, g_b)]

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = _strategy().aggregate_train(1, replies)

    # Assert
    torch.testing.assert_close(
        _prompt_of(arrays), _prompt() - LR * (g_a + g_b) / 2, rtol=0, atol=1e-7
    )
    assert metrics is not None
    assert (metrics[wire.ACCEPTED], metrics[wire.REJECTED]) == (2, 1)
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"node {BAD}" in m and reason in m for m in refusals), refusals


def test_duplicate_reply_from_one_node_counts_once(caplog: pytest.LogCaptureFixture) -> None:
    g_a, g_b = _grad(0.3), _grad(0.6).flip(1)
    replies = [_reply(GOOD_A, g_a), _reply(GOOD_A, g_a), _reply(GOOD_B, g_b)]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = _strategy().aggregate_train(1, replies)

    torch.testing.assert_close(
        _prompt_of(arrays), _prompt() - LR * (g_a + g_b) / 2, rtol=0, atol=1e-7
    )
    assert any("duplicate" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "metrics",
    [
        {wire.TRAIN_LOSS: 0.5}, {wire.NUM_EXAMPLES: 1000}, {"eps-local": 0.1},
        {wire.SAMPLE_RATE: None},
    ],
)
def test_with_dp_a_reply_carrying_any_statistic_is_refused(
    metrics: dict[str, float], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a client leaking its loss or size (or stating no rate) must neither be
    # used nor move the accounting, which then covers it at the public bound
    plan = _plan(**{"dp-mode": "per-sample", "epsilon": 2.0, "num-server-rounds": 5})
    strategy = _strategy(channel=plan)
    leaking = _content_with(
        {G: _grad(0.1)}, **{wire.TRAIN_LOSS: None, wire.SAMPLE_RATE: RATE, **metrics}
    )

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, out = strategy.aggregate_train(
            1, [_reply(GOOD_A, _grad(0.3), dp_on=True), make_reply(leaking, src_node_id=BAD)]
        )

    # Assert
    assert out is not None and (out[wire.ACCEPTED], out[wire.REJECTED]) == (1, 1)
    assert out[wire.EPSILON] == plan.epsilon(1)
    assert wire.TRAIN_LOSS not in out
    assert any(f"node {BAD}" in r.getMessage() and "nothing but" in r.getMessage()
               for r in caplog.records)


def test_each_node_is_accounted_at_its_declared_rate_and_the_run_at_the_largest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node A declares a low rate, node B the bound, node BAD more than the bound
    plan = _plan(**{"dp-mode": "per-sample", "epsilon": 2.0, "num-server-rounds": 5})
    strategy = _strategy(channel=plan)
    replies = [
        _reply(GOOD_A, _grad(0.3), dp_on=True, rate=0.05),
        _reply(GOOD_B, _grad(0.3), dp_on=True, rate=RATE),
        _reply(BAD, _grad(0.3), dp_on=True, rate=0.9),
    ]

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, out = strategy.aggregate_train(1, replies)

    # Assert: BAD is refused (its rate is not covered), A's epsilon is its own, the run's
    # is the largest node's (BAD trained without an accepted rate: the bound covers it)
    assert out is not None and (out[wire.ACCEPTED], out[wire.REJECTED]) == (2, 1)
    assert any(f"node {BAD}" in r.getMessage() and "max-sample-rate=0.5" in r.getMessage()
               for r in caplog.records)
    nodes = strategy.node_epsilons()
    assert nodes[str(GOOD_A)] == {"sample-rate": 0.05, "epsilon": plan.epsilon(1, 0.05)}
    assert nodes[str(GOOD_B)]["epsilon"] == plan.epsilon(1) > plan.epsilon(1, 0.05)
    assert str(BAD) not in nodes
    assert out[wire.EPSILON] == strategy.epsilon() == plan.epsilon(1)


def test_run_epsilon_is_the_largest_declared_rate_when_every_node_reported() -> None:
    plan = _plan(**{"dp-mode": "per-sample", "epsilon": 2.0, "num-server-rounds": 5})
    strategy = _strategy(channel=plan)
    replies = [_reply(GOOD_A, _grad(0.3), dp_on=True, rate=r) for r in (0.05,)]
    replies.append(_reply(GOOD_B, _grad(0.3), dp_on=True, rate=0.1))
    _, out = strategy.aggregate_train(1, replies)
    assert out is not None and out[wire.EPSILON] == plan.epsilon(1, 0.1) < plan.epsilon(1)
    restored = _strategy(channel=plan)
    restored.load_state_dict(strategy.state_dict())
    assert restored.epsilon() == strategy.epsilon()
    assert restored.node_epsilons() == strategy.node_epsilons()


def test_all_replies_bad_leaves_prompt_unchanged_but_the_round_still_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the clients took their local steps, so the composed epsilon counts the
    # round even though the server released nothing
    plan = _plan(**{"dp-mode": "per-sample", "epsilon": 1.0, "num-server-rounds": 5})
    strategy = _strategy(channel=plan)
    replies = [
        make_reply(BAD_REPLIES["nan"][0](), src_node_id=BAD),
        _reply(GOOD_A, _grad(0.1), dp_on=False),  # carries a loss: refused with DP
    ]

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert
    assert arrays is None
    torch.testing.assert_close(strategy.global_prompt, _prompt(), rtol=0, atol=0)
    assert metrics is not None and (metrics[wire.ACCEPTED], metrics[wire.REJECTED]) == (0, 2)
    assert strategy.epsilon() == plan.epsilon(1) > 0
    assert any("every reply refused" in r.getMessage() for r in caplog.records)


# --- noise ------------------------------------------------------------------------------
def test_noise_std_matches_z_c_over_b_n_with_n_counting_accepted_replies_only() -> None:
    # Prepare: 3 accepted zero-gradient replies + 1 refused; 32768 noise samples.
    shape, lr = (64, 512), 1.0
    plan = _plan(**{"dp-mode": "paper", "epsilon": 40.0, "num-server-rounds": 2})
    z = plan.z_global
    strategy = _strategy(initial_prompt=torch.zeros(shape), channel=plan, server_lr=lr)
    replies = [_reply(1_000 + i, torch.zeros(shape), dp_on=True) for i in range(3)]
    replies.append(_reply(BAD, torch.full(shape, math.nan), dp_on=True))

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: noisy - noiseless = -lr * noise. The sample std of n i.i.d. Gaussians has
    # relative standard error 1/sqrt(2n) (0.4% here); allow 5 standard errors. Counting
    # the refused reply (N = 4) would be 25% off.
    sample = -_prompt_of(arrays).double().flatten() / lr
    n, expected_std = sample.numel(), z * CLIP / (BATCH * 3)
    assert abs(float(sample.std()) / expected_std - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(sample.mean())) < 5 * expected_std / math.sqrt(n)
    assert metrics is not None and metrics[wire.NOISE_STD] == pytest.approx(expected_std)


def _noised_once(seed: int | None) -> torch.Tensor:
    plan = _plan(**{"dp-mode": "paper", "epsilon": 1.0, "num-server-rounds": 2})
    strategy = _strategy(channel=plan, seed=seed)
    return _prompt_of(strategy.aggregate_train(1, [_reply(GOOD_A, _grad(0.1), dp_on=True)])[0])


def test_public_seed_reproduces_the_noise_and_no_seed_never_does() -> None:
    same, again, other = _noised_once(7), _noised_once(7), _noised_once(8)
    torch.testing.assert_close(same, again, rtol=0, atol=0)
    assert not torch.equal(same, other)
    # production: a secret 256-bit OS key per strategy, never derived from the config
    secret_a, secret_b = _noised_once(None), _noised_once(None)
    assert not torch.equal(secret_a, secret_b)
    assert not any(torch.equal(secret_a, _noised_once(s)) for s in (0, 1, 7))


def test_paper_mode_reports_nominal_epsilon_and_says_it_is_not_formal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = _plan(**{"dp-mode": "paper", "epsilon": 0.4, "num-server-rounds": 100})
    strategy = _strategy(channel=plan)

    with caplog.at_level(logging.INFO, logger="flwr"):
        strategy.summary()
        for r in (1, 2):
            _, metrics = strategy.aggregate_train(r, [_reply(GOOD_A, _grad(0.1), dp_on=True)])

    assert metrics is not None and metrics[wire.EPSILON] == 0.4
    assert sum("NOT a formal" in rec.getMessage() for rec in caplog.records) == 1


# --- accounting -------------------------------------------------------------------------
def _opacus_epsilon(history: list[tuple[float, float]], delta: float) -> float:
    """A fresh opacus RDP accountant fed one step per release (an independent count)."""
    accountant = RDPAccountant()
    for z, q in history:
        accountant.step(noise_multiplier=z, sample_rate=q)
    return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))


@pytest.mark.parametrize("local_steps", [1, 3])
def test_epsilon_after_t_rounds_equals_opacus_and_reaches_at_most_the_target(
    local_steps: int,
) -> None:
    # Prepare: the composed multiplier over T K steps at the public rate bound
    target, delta, rounds, q = 2.0, 1e-5, 3, 0.1
    plan = _plan(
        **{
            "dp-mode": "per-sample", "epsilon": target, "delta": delta,
            "num-server-rounds": rounds, "max-sample-rate": q, "local-steps": local_steps,
        }
    )
    strategy = _strategy(channel=plan)

    # Execute
    reported = []
    for r in range(1, rounds + 1):
        _, metrics = strategy.aggregate_train(r, [_reply(GOOD_A, _grad(0.5), dp_on=True)])
        assert metrics is not None
        reported.append(metrics[wire.EPSILON])

    # Assert
    for t, eps in enumerate(reported, start=1):
        expected = _opacus_epsilon([(plan.z_step, q)] * (t * local_steps), delta)
        assert eps == pytest.approx(expected, rel=1e-9)
    assert 0.95 * target <= reported[-1] <= target


# --- evaluate ---------------------------------------------------------------------------
def _eval_reply(node: int, local_acc: float, local_n: int, neighbour_acc: float) -> Message:
    content = wire.evaluate_reply_content(
        local_acc=local_acc,
        neighbour_acc=neighbour_acc,
        zeroshot_local_acc=local_acc / 2,
        zeroshot_neighbour_acc=neighbour_acc / 2,
        prior_local_acc=local_acc / 2,
        prior_neighbour_acc=neighbour_acc / 2,
        local_examples=local_n,
        neighbour_examples=50,
        partition_id=node % 7,
    )
    return make_reply(content, src_node_id=node, message_type=MessageType.EVALUATE)


def test_evaluate_means_over_clients_and_weighted_and_refuses_arrays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    seen: list[tuple[int, dict[str, float | int]]] = []
    strategy = _strategy(on_round=lambda r, m: seen.append((r, m)))
    leaking = _eval_reply(BAD, 1.0, 10, 1.0)
    leaking.content[wire.ARRAYS_RECORD] = ArrayRecord({"local-prompt": Array(_grad(0.1))})
    replies = [_eval_reply(GOOD_A, 0.9, 10, 0.2), _eval_reply(GOOD_B, 0.5, 30, 0.4), leaking]

    # Execute
    strategy.aggregate_train(1, [_reply(GOOD_A, _grad(0.1))])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = strategy.aggregate_evaluate(1, replies)

    # Assert
    assert metrics is not None
    assert metrics[wire.LOCAL_ACC] == pytest.approx(0.7)
    assert metrics[wire.LOCAL_ACC_WEIGHTED] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40)
    assert metrics[wire.NEIGHBOUR_ACC] == pytest.approx(0.3)
    assert metrics[wire.ZEROSHOT_LOCAL_ACC] == pytest.approx(0.35)
    assert metrics[wire.ZEROSHOT_NEIGHBOUR_ACC] == pytest.approx(0.15)
    assert (metrics[wire.EVAL_ACCEPTED], metrics[wire.EVAL_REJECTED]) == (2, 1)
    assert any(
        f"node {BAD}" in r.getMessage() and "unexpected records" in r.getMessage()
        for r in caplog.records
    )
    ((round_, merged),) = seen
    assert (
        round_ == 1 and merged[wire.ACCEPTED] == 1 and merged[wire.LOCAL_ACC] == pytest.approx(0.7)
    )
    # the results get every accepted client's own figures too; the refused one has none
    assert merged[f"local-acc/node-{GOOD_A}"] == pytest.approx(0.9)
    assert merged[f"neighbour-acc/node-{GOOD_B}"] == pytest.approx(0.4)
    assert merged[f"partition-id/node-{GOOD_A}"] == GOOD_A % 7  # for the node map
    assert not any(str(BAD) in key for key in merged)


def _hm(local: float, neighbour: float) -> float:
    return 2 * local * neighbour / (local + neighbour)


def test_evaluate_reports_the_mean_of_each_clients_harmonic_mean_and_all_class_accuracy(
) -> None:
    # Prepare: A is one-sided (0.9 local, 0.2 neighbour), B balanced; 50 neighbour images
    # each, 10 and 30 local; zero-shot and the prior report half of each accuracy
    seen: list[tuple[int, dict[str, float | int]]] = []
    strategy = _strategy(on_round=lambda r, m: seen.append((r, m)))
    replies = [_eval_reply(GOOD_A, 0.9, 10, 0.2), _eval_reply(GOOD_B, 0.5, 30, 0.4)]

    # Execute
    strategy.aggregate_train(1, [_reply(GOOD_A, _grad(0.1))])
    metrics = strategy.aggregate_evaluate(1, replies)

    # Assert: the headline is the mean of the per-client harmonic means, not the
    # harmonic mean of the mean accuracies (0.7 and 0.3)
    assert metrics is not None
    assert metrics[wire.HARMONIC_ACC] == pytest.approx((_hm(0.9, 0.2) + _hm(0.5, 0.4)) / 2)
    assert metrics[wire.HARMONIC_ACC] != pytest.approx(_hm(0.7, 0.3))
    assert metrics[wire.ZEROSHOT_HARMONIC_ACC] == pytest.approx(
        (_hm(0.45, 0.1) + _hm(0.25, 0.2)) / 2
    )
    assert metrics[wire.PRIOR_HARMONIC_ACC] == pytest.approx(metrics[wire.ZEROSHOT_HARMONIC_ACC])
    # ... all-class accuracy: each client's correct over its local and neighbour images
    a_all, b_all = (9 + 10) / 60, (15 + 20) / 80
    assert metrics[wire.ALL_ACC] == pytest.approx((a_all + b_all) / 2)
    assert metrics[wire.ALL_ACC_WEIGHTED] == pytest.approx((9 + 10 + 15 + 20) / 140)
    assert metrics[wire.PRIOR_ALL_ACC] == pytest.approx((a_all + b_all) / 4)
    # ... and each client's own, for the results files
    ((_, merged),) = seen
    assert merged[f"harmonic-acc/node-{GOOD_A}"] == pytest.approx(_hm(0.9, 0.2))
    assert merged[f"all-acc/node-{GOOD_B}"] == pytest.approx(b_all)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({wire.PRIOR_LOCAL_ACC: 1.5}, "must be finite and in"),
        ({wire.PRIOR_NEIGHBOUR_ACC: -0.1}, "must be finite and in"),
        ({wire.PRIOR_LOCAL_ACC: 0.9, wire.PRIOR_NEIGHBOUR_ACC: 0.0}, "below zero-shot"),
    ],
)
def test_evaluate_refuses_class_prior_figures_out_of_range_or_below_zero_shot(
    change: dict[str, float], message: str
) -> None:
    # Prepare: zero-shot 0.45 / 0.1; a frontier that includes b = 0 cannot be below it
    reply = _eval_reply(GOOD_A, 0.9, 10, 0.2)
    metrics = reply.content.metric_records[wire.METRICS_RECORD]
    for key, value in change.items():
        metrics[key] = value

    # Execute / Assert
    with pytest.raises(wire.InvalidReply, match=message):
        wire.parse_evaluate_reply(reply)


@pytest.mark.parametrize(
    "change", [{"train-loss": 0.3}, {wire.ZEROSHOT_LOCAL_ACC: None}], ids=["extra", "missing"]
)
def test_evaluate_refuses_a_reply_whose_metric_keys_are_not_exactly_the_protocols(
    change: dict[str, float | None],
) -> None:
    # Prepare: a loss (a statistic of the training data) must not ride along an evaluation
    reply = _eval_reply(GOOD_A, 0.9, 10, 0.2)
    metrics = reply.content.metric_records[wire.METRICS_RECORD]
    for key, value in change.items():
        if value is None:
            del metrics[key]
        else:
            metrics[key] = value

    # Execute / Assert
    with pytest.raises(wire.InvalidReply, match="are not exactly"):
        wire.parse_evaluate_reply(reply)


# --- configure and node waiting ---------------------------------------------------------
_idle_app = ClientApp()


def test_configure_train_samples_copies_config_and_broadcasts_the_prompt() -> None:
    # Prepare
    grid = InProcessGrid(client_app=_idle_app, num_nodes=4, run_config={})
    config = ConfigRecord({"lr": 0.1})
    strategy = _strategy(fraction_train=0.5, min_nodes=1)

    # Execute
    messages = list(strategy.configure_train(3, strategy.global_arrays(), config, grid))

    # Assert
    assert len(messages) == 2 and len({m.metadata.dst_node_id for m in messages}) == 2
    assert dict(config) == {"lr": 0.1}
    for msg in messages:
        assert msg.metadata.message_type == MessageType.TRAIN
        assert dict(msg.content[wire.CONFIG_RECORD]) == {
            "lr": 0.1, wire.SERVER_ROUND: 3, wire.AGGREGATION: "plain"
        }
        torch.testing.assert_close(
            wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD]), _prompt()
        )


_answering_app = ClientApp()


@_answering_app.train()
def _answer_train(msg: Message, context: object) -> Message:
    return Message(_train_content(_grad(0.5)), reply_to=msg)


@_answering_app.evaluate()
def _answer_evaluate(msg: Message, context: object) -> Message:
    content = _eval_reply(0, 0.75, 10, 0.25).content
    return Message(content, reply_to=msg)


def test_evaluate_every_k_evaluates_only_every_kth_and_the_final_round() -> None:
    # Prepare: 5 rounds, every 2nd evaluated, and the last one (5) although 5 % 2 != 0
    rows: dict[int, dict[str, object]] = {}
    strategy = _strategy(
        evaluate_every=2, final_round=5, on_round=lambda r, m: rows.__setitem__(r, dict(m))
    )

    # Execute
    run = run_strategy(
        strategy,
        client_app=_answering_app,
        num_nodes=2,
        initial_arrays=strategy.global_arrays(),
        num_rounds=5,
    )

    # Assert: evaluate messages went out in rounds 2, 4 and 5 only, 2 nodes each
    evaluated = [
        int(r.metadata.group_id)
        for r in run.replies
        if r.metadata.message_type == MessageType.EVALUATE
    ]
    assert sorted(evaluated) == [2, 2, 4, 4, 5, 5]
    assert sorted(rows) == [1, 2, 3, 4, 5]  # every round is recorded, trained or not
    for round_, row in rows.items():
        assert row["accepted"] == 2  # training happened every round
        if round_ in (2, 4, 5):
            assert row[wire.LOCAL_ACC] == pytest.approx(0.75) and row[wire.EVAL_ACCEPTED] == 2
        else:  # no accuracy and no "0 accepted" that would read as a failed evaluation
            assert wire.LOCAL_ACC not in row and wire.EVAL_ACCEPTED not in row
    assert set(run.result.evaluate_metrics_clientapp) == {2, 4, 5}


def test_node_wait_timeout_raises_with_seen_needed_and_what_to_check() -> None:
    grid = InProcessGrid(client_app=_idle_app, num_nodes=1, run_config={})
    strategy = _strategy(min_nodes=2, node_wait_timeout=0.05)

    with pytest.raises(
        RuntimeError, match=r"only 1 node\(s\) connected .* min-nodes=2 .*SuperLink"
    ):
        strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), grid)
    with pytest.raises(RuntimeError, match="min-nodes=2"):
        strategy.configure_evaluate(1, strategy.global_arrays(), ConfigRecord(), grid)


class _LateNodesGrid(InProcessGrid):
    """Transport double: reports one node for the first calls, then all of them."""

    calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        nodes = list(super().get_node_ids())
        return nodes[:1] if self.calls <= 2 else nodes


def test_sampling_waits_for_late_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_wait, "NODE_POLL_INTERVAL", 0.01)
    grid = _LateNodesGrid(client_app=_idle_app, num_nodes=3, run_config={})
    strategy = _strategy(min_nodes=3, node_wait_timeout=5.0)

    messages = list(strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), grid))

    assert len(messages) == 3 and grid.calls == 3


# --- checkpoint -------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_exactly() -> None:
    # Prepare: two per-sample rounds, then a checkpoint through torch.save/load; the
    # public seed's noise stream continues where it stopped after the resume
    plan = _plan(**{"dp-mode": "per-sample", "epsilon": 2.0, "num-server-rounds": 5})
    original = _strategy(channel=plan, seed=5)
    for r in (1, 2):
        original.aggregate_train(
            r, [_reply(GOOD_A, _grad(0.5), dp_on=True), _reply(GOOD_B, _grad(0.3), dp_on=True)]
        )
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)

    # Execute
    resumed = _strategy(channel=plan, initial_prompt=torch.zeros(SHAPE), seed=5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    grid = InProcessGrid(client_app=_idle_app, num_nodes=1, run_config={})
    (msg,) = resumed.configure_train(1, resumed.global_arrays(), ConfigRecord(), grid)
    third = [_reply(GOOD_A, _grad(0.4), dp_on=True)]
    out_original, m_original = original.aggregate_train(3, third)
    out_resumed, m_resumed = resumed.aggregate_train(1, third)  # resumed run restarts at 1

    # Assert
    torch.testing.assert_close(_prompt_of(out_resumed), _prompt_of(out_original), rtol=0, atol=0)
    assert m_resumed is not None and m_original is not None
    assert dict(m_resumed) == dict(m_original)
    assert resumed.rounds_done == original.rounds_done == 3
    assert msg.content[wire.CONFIG_RECORD][wire.SERVER_ROUND] == 3  # continues the count


def test_load_state_dict_refuses_another_privacy_plan() -> None:
    state = _strategy(channel=_plan(**{"dp-mode": "per-sample", "epsilon": 2.0})).state_dict()
    other = _strategy(channel=_plan(**{"dp-mode": "per-sample", "epsilon": 1.0}))
    with pytest.raises(ValueError, match="privacy plan"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="state keys"):
        other.load_state_dict({**state, "extra": 1})


def test_a_plain_checkpoint_that_still_lists_no_secure_rounds_resumes() -> None:
    # Prepare: the state as one class for both exchanges wrote it, and one that is not
    state = _strategy().state_dict()
    legacy, forged = {**state, "secure_rounds": []}, {**state, "secure_rounds": [1.0]}

    # Execute / Assert: an empty list is that old format; a release is never dropped
    resumed = _strategy(initial_prompt=torch.zeros(SHAPE))
    resumed.load_state_dict(legacy)
    torch.testing.assert_close(resumed.global_prompt, state["global_prompt"])
    with pytest.raises(ValueError, match="state keys"):
        _strategy().load_state_dict(forged)


def test_the_strategy_class_must_fit_the_channels_aggregation() -> None:
    from dpfpl_app.federation.secure_strategy import SecureDPFPLStrategy

    with pytest.raises(ValueError, match="needs SecureDPFPLStrategy"):
        _strategy(channel=_plan(aggregation="secure"))
    with pytest.raises(ValueError, match="needs DPFPLStrategy"):
        SecureDPFPLStrategy(initial_prompt=_prompt(), server_lr=LR, channel=_plan())


# --- validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("server_lr", 0.0),
        ("server_lr", math.inf),
        ("min_nodes", 0),
        ("fraction_train", 0.0),
        ("fraction_evaluate", 1.5),
        ("evaluate_every", 0),
        ("node_wait_timeout", 0.0),
        ("channel", "off"),
        ("initial_prompt", torch.zeros(SHAPE, dtype=torch.float64)),
        ("initial_prompt", torch.full(SHAPE, math.nan)),
    ],
)
def test_constructor_rejects_bad_arguments_by_name(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        _strategy(**{name: value})
