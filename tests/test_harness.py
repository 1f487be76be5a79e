"""The in-process federation harness drives real Flower apps end to end."""

from __future__ import annotations

import pytest
import torch
from flower_harness import InProcessGrid, node_id_of, run_server_app, run_strategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dpfpl_app.config import RunConfig
from dpfpl_app.federation import wire
from dpfpl_app.federation.strategy import DPFPLStrategy
from dpfpl_app.privacy.dp_channel import plan_for

SHAPE = (4, 8)
NUM_NODES = 3


def _fixed_grad(partition_id: int) -> torch.Tensor:
    """A different, small (norm < clip) gradient per partition."""
    return torch.full(SHAPE, 0.01 * (partition_id + 1)) + torch.arange(SHAPE[1]) * 1e-3


def _initial_prompt() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, SHAPE[0] * SHAPE[1]).reshape(SHAPE)


def _count_call(context: Context) -> int:
    """Calls so far on this node, kept in context.state (must persist across rounds)."""
    calls = 1 + int(context.state.config_records.get("calls", ConfigRecord({"n": 0}))["n"])
    context.state["calls"] = ConfigRecord({"n": calls})
    return calls


fixed_grad_app = ClientApp()


@fixed_grad_app.train()
def _train(msg: Message, context: Context) -> Message:
    wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD])  # the broadcast must parse
    partition = int(context.node_config["partition-id"])
    calls = _count_call(context)
    content = wire.train_reply_content(
        grad=_fixed_grad(partition), train_loss=float(calls), dp_on=False, sample_rate=None
    )
    return Message(content, reply_to=msg)


@fixed_grad_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    content = wire.evaluate_reply_content(
        local_acc=0.5 + 0.1 * partition,
        neighbour_acc=0.1,
        zeroshot_local_acc=0.4,
        zeroshot_neighbour_acc=0.1,
        prior_local_acc=0.5,
        prior_neighbour_acc=0.1,
        local_examples=10,
        neighbour_examples=20,
        partition_id=partition,
    )
    return Message(content, reply_to=msg)


def _strategy(**overrides: object) -> DPFPLStrategy:
    kwargs: dict[str, object] = {
        "initial_prompt": _initial_prompt(),
        "server_lr": 0.5,
        "channel": plan_for(RunConfig(clip_norm=10.0, batch_size=4, dp_mode="off")),
        "min_nodes": NUM_NODES,
        "node_wait_timeout": 1.0,
        "seed": 0,
    }
    kwargs.update(overrides)
    return DPFPLStrategy(**kwargs)  # type: ignore[arg-type]


def test_prompt_moves_by_minus_lr_times_mean_grad_each_round() -> None:
    # Prepare
    prompts: dict[int, torch.Tensor] = {}
    strategy = _strategy()
    strategy.on_round = lambda r, _metrics: prompts.__setitem__(r, strategy.global_prompt)
    mean_grad = torch.stack([_fixed_grad(i) for i in range(NUM_NODES)]).mean(dim=0)

    # Execute
    run = run_strategy(
        strategy,
        client_app=fixed_grad_app,
        num_nodes=NUM_NODES,
        initial_arrays=strategy.global_arrays(),
        num_rounds=3,
    )

    # Assert
    for r in (1, 2, 3):
        expected = _initial_prompt() - r * 0.5 * mean_grad
        torch.testing.assert_close(prompts[r], expected, rtol=0, atol=1e-6)
    assert run.result is not None
    torch.testing.assert_close(
        wire.read_global_prompt(run.result.arrays), prompts[3], rtol=0, atol=0
    )


def test_every_reply_is_intercepted_and_node_state_persists() -> None:
    # Prepare
    seen: list[Message] = []

    # Execute
    run = run_strategy(
        _strategy(),
        client_app=fixed_grad_app,
        num_nodes=NUM_NODES,
        initial_arrays=_strategy().global_arrays(),
        num_rounds=3,
        on_reply=seen.append,
    )

    # Assert: 3 rounds x 3 nodes x (train + evaluate), all from distinct real node ids
    assert len(seen) == len(run.replies) == 3 * NUM_NODES * 2
    assert {m.metadata.src_node_id for m in seen} == {node_id_of(i) for i in range(NUM_NODES)}
    assert run.result is not None
    # each node's train-loss is its call count from context.state: round r -> r
    losses = [run.result.train_metrics_clientapp[r][wire.TRAIN_LOSS] for r in (1, 2, 3)]
    assert losses == [1.0, 2.0, 3.0]
    partitions = sorted(int(c.node_config["partition-id"]) for c in run.grid.contexts.values())
    assert partitions == list(range(NUM_NODES))


def test_client_exception_becomes_an_error_reply_that_the_strategy_refuses() -> None:
    # Prepare
    crashing_app = ClientApp()

    @crashing_app.train()
    def _train_or_crash(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 0:
            raise RuntimeError("disk full")
        return _train(msg, context)

    @crashing_app.evaluate()
    def _eval(msg: Message, context: Context) -> Message:
        return _evaluate(msg, context)

    # Execute
    run = run_strategy(
        _strategy(),
        client_app=crashing_app,
        num_nodes=NUM_NODES,
        initial_arrays=_strategy().global_arrays(),
        num_rounds=1,
    )

    # Assert
    errors = [m for m in run.replies if m.has_error()]
    assert len(errors) == 1 and "disk full" in (errors[0].error.reason or "")
    assert run.result is not None
    metrics = run.result.train_metrics_clientapp[1]
    assert (metrics[wire.ACCEPTED], metrics[wire.REJECTED]) == (NUM_NODES - 1, 1)


def test_a_client_mutating_its_message_cannot_touch_the_server_or_other_nodes() -> None:
    # Prepare: node 0 overwrites the prompt it received; the others record theirs.
    received: dict[int, torch.Tensor] = {}
    app = ClientApp()

    @app.train()
    def _mutating_train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        received[partition] = wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD])
        if partition == 0:
            msg.content[wire.ARRAYS_RECORD] = ArrayRecord({"x": Array(torch.zeros(1))})
        return _train(msg, context)

    strategy = _strategy(fraction_evaluate=1.0)
    grid = InProcessGrid(client_app=app, num_nodes=NUM_NODES, run_config={})

    # Execute
    messages = strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)

    # Assert
    for partition in range(NUM_NODES):
        torch.testing.assert_close(received[partition], _initial_prompt(), rtol=0, atol=0)
    assert len(list(replies)) == NUM_NODES


def test_harness_runs_a_server_app_main_function() -> None:
    # Prepare: a ServerApp shaped like ours: strategy from the run config, results in state.
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = _strategy(server_lr=float(context.run_config["server-lr"]))
        result = strategy.start(
            grid=grid,
            initial_arrays=strategy.global_arrays(),
            num_rounds=int(context.run_config["num-server-rounds"]),
        )
        context.state["final"] = result.arrays
        context.state["acc"] = MetricRecord(dict(result.evaluate_metrics_clientapp[2]))

    # Execute
    run = run_server_app(
        server_app,
        client_app=fixed_grad_app,
        num_nodes=NUM_NODES,
        run_config={"server-lr": 0.25, "num-server-rounds": 2},
    )

    # Assert
    assert run.server_context is not None
    mean_grad = torch.stack([_fixed_grad(i) for i in range(NUM_NODES)]).mean(dim=0)
    final = wire.read_global_prompt(run.server_context.state.array_records["final"])
    torch.testing.assert_close(final, _initial_prompt() - 2 * 0.25 * mean_grad, rtol=0, atol=1e-6)
    acc = run.server_context.state.metric_records["acc"]
    assert acc[wire.LOCAL_ACC] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert all(c.run_config["server-lr"] == 0.25 for c in run.grid.contexts.values())


def test_run_config_must_be_flat_scalars_as_in_flower() -> None:
    with pytest.raises(TypeError, match="bool/int/float/str"):
        InProcessGrid(client_app=fixed_grad_app, num_nodes=1, run_config={"lrs": [0.1]})  # type: ignore[dict-item]
