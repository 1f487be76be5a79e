"""The stage payloads through real Flower Messages, action routing and node state.

Not the strategy wiring (that is the strategy's job): a minimal ClientApp with one
handler per stage, registered as ``@app.query(<stage>)``, run by the project's
in-process grid (real message serialisation, contexts round-tripped through protobuf,
a raising handler turned into an error reply as Flower does). It proves the claims the
package makes to the strategy: payloads fit ConfigRecord/ArrayRecord, secrets live in
``context.state`` between messages and are gone after the round, and an error reply
is just a dropout.
"""

from __future__ import annotations

import numpy as np
from flower_harness import InProcessGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpfpl_app.secagg import ARRAY_KEYS, ClientRound, SecAggConfig, ServerRound, Stage
from dpfpl_app.secagg.server import DONE

CONFIG = SecAggConfig(dim=32, clip=1.0, sum_noise_std=0.0)
STATE_KEY = "secagg"
FAILING_NODE_INDEX = 2  # this node's ClientApp raises at the masked-input stage


def to_records(payload: dict) -> RecordDict:
    arrays = {k: Array(v) for k, v in payload.items() if k in ARRAY_KEYS}
    return RecordDict(
        {
            "secagg": ConfigRecord({k: v for k, v in payload.items() if k not in ARRAY_KEYS}),
            "secagg-arrays": ArrayRecord(arrays),
        }
    )


def from_records(content: RecordDict) -> dict:
    out = dict(content.config_records["secagg"])
    out.update({k: a.numpy() for k, a in content.array_records["secagg-arrays"].items()})
    return out


def node_input(node_id: int) -> np.ndarray:
    x = np.random.default_rng(node_id % 2**32).normal(size=CONFIG.dim)
    return x / np.linalg.norm(x) * 0.8


app = ClientApp()


def _stage(msg: Message, context: Context, stage: str) -> Message:
    payload = from_records(msg.content)
    node = context.node_id
    if stage == Stage.SETUP:
        client = ClientRound(CONFIG, node)
    else:
        client = ClientRound.from_state(CONFIG, node, dict(context.state.config_records[STATE_KEY]))
    if stage == Stage.SHARE_KEYS:
        reply = client.share_keys(payload)
    elif stage == Stage.COLLECT_MASKED:
        if context.node_config["partition-id"] == FAILING_NODE_INDEX:
            raise RuntimeError("training crashed")
        reply = client.collect_masked(payload, node_input(node))
    elif stage == Stage.CONSISTENCY:
        reply = client.consistency(payload)
    elif stage == Stage.UNMASK:
        reply = client.unmask(payload)
    else:
        reply = client.setup(payload)
    if client.stage == "done":
        del context.state[STATE_KEY]  # the round's secrets leave the node's state
    else:
        context.state[STATE_KEY] = ConfigRecord(client.to_state())
    return Message(to_records(reply), reply_to=msg)


@app.query(Stage.SETUP)
def setup(msg: Message, context: Context) -> Message:
    return _stage(msg, context, Stage.SETUP)


@app.query(Stage.SHARE_KEYS)
def share_keys(msg: Message, context: Context) -> Message:
    return _stage(msg, context, Stage.SHARE_KEYS)


@app.train(Stage.COLLECT_MASKED)
def collect_masked(msg: Message, context: Context) -> Message:
    return _stage(msg, context, Stage.COLLECT_MASKED)


@app.query(Stage.CONSISTENCY)
def consistency(msg: Message, context: Context) -> Message:
    return _stage(msg, context, Stage.CONSISTENCY)


@app.query(Stage.UNMASK)
def unmask(msg: Message, context: Context) -> Message:
    return _stage(msg, context, Stage.UNMASK)


CATEGORY = {Stage.COLLECT_MASKED: "train"}  # the other stages are queries


def test_one_round_through_flower_messages_with_a_crashing_node() -> None:
    grid = InProcessGrid(client_app=app, num_nodes=5, run_config={})
    nodes = list(grid.get_node_ids())
    server = ServerRound(CONFIG, nodes)
    out = server.setup()
    while server.pending != DONE:
        stage = server.pending
        kind = f"{CATEGORY.get(stage, 'query')}.{stage}"
        messages = [Message(to_records(p), node, kind) for node, p in out.items()]
        replies = {
            r.metadata.src_node_id: from_records(r.content)
            for r in grid.send_and_receive(messages)
            if not r.has_error()  # an error reply is a dropout
        }
        out = server.receive(replies)
    result = out
    crashed = nodes[FAILING_NODE_INDEX]
    assert set(result.survivors) == set(nodes) - {crashed}
    expected = sum(node_input(v) for v in result.survivors)
    # no noise here: only randomised rounding, < 1 unit per client and coordinate
    assert np.all(np.abs(result.total - expected) < len(result.survivors) / result.params.scale)
    # secrets are gone from every node that finished; the crashed node keeps its
    # stage-2 state until the strategy's next round overwrites it
    for node, context in grid.contexts.items():
        assert (STATE_KEY in context.state) == (node == crashed)
