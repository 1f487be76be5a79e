"""A whole Flower federation in one process, without a SuperLink: for tests.

``InProcessGrid`` is a real ``flwr.serverapp.Grid``: a strategy's ``start(...)`` or a
ServerApp's ``@app.main()`` function drives it exactly as it drives the SuperLink's
grid, and each message is executed by calling the real ``ClientApp`` with that node's
``Context``. What it keeps from a real run:

- every message and reply goes through Flower's protobuf serialisation, so the client
  gets a copy (never the server's objects) and anything that would not survive the wire
  fails here too;
- each node has its own ``Context`` with ``node_config`` {"partition-id": i,
  "num-partitions": N}, the shared ``run_config``, and a ``state`` that persists across
  rounds (itself round-tripped through protobuf, as the SuperNode stores it);
- node ids are large and unrelated to partition ids, as Flower's are;
- a ClientApp exception becomes an error reply with Flower's error code, as in the
  runtime;
- ``on_reply`` sees every reply on its way back, and ``grid.replies`` keeps them all.

What it does not model: the fresh process per message (module-level caches survive
here), timeouts and node dropouts, and message TTLs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.run import Run

DEFAULT_RUN_ID = 4242
# Flower draws node ids at random from 64 bits; spaced, large ids catch code that
# confuses a node id with a partition id.
_NODE_ID_BASE = 7_000_000_000
_NODE_ID_STRIDE = 7_919

_log = logging.getLogger(__name__)

UserConfigValue = bool | int | float | str
ReplyHook = Callable[[Message], None]


# --- Flower private API: the only places this project touches it -----------------------
def set_task_identity(*, run_id: int, node_id: int = SUPERLINK_NODE_ID, task_id: int = 1) -> None:
    """Stamp the process with a task identity so that ``Message(...)`` can be built.

    Flower 1.41 fills a new instruction message's ``run_id``, ``src_node_id`` and
    ``src_task_id`` from the private class ``flwr.supercore.task_identity.TaskIdentity``,
    which its runtimes set before running an app; outside a runtime, ``Message(...)``
    raises "TaskIdentity.run_id is not set". A Flower upgrade that changes this breaks
    here and only here.
    """
    from flwr.supercore.task_identity import TaskIdentity  # private API, imported here only

    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def _assign_message_id(msg: Message) -> None:
    """Give a message the id a SuperLink would; Metadata has no public setter for it.

    Flower's own ``InMemoryGrid`` and simulation engine do exactly this.
    """
    msg.metadata.__dict__["_message_id"] = str(uuid4())


# --- message builders for strategy unit tests ----------------------------------------------
def make_instruction(
    content: RecordDict,
    *,
    dst_node_id: int,
    message_type: str = MessageType.TRAIN,
    run_id: int = DEFAULT_RUN_ID,
) -> Message:
    """Build a server -> node message as a strategy would send it (with a message id)."""
    set_task_identity(run_id=run_id)
    msg = Message(content, dst_node_id, message_type)
    _assign_message_id(msg)
    return msg


def make_reply(
    content: RecordDict | Error,
    *,
    src_node_id: int,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """Build a reply from ``src_node_id`` as the server receives it (content or error)."""
    instruction = make_instruction(RecordDict(), dst_node_id=src_node_id, message_type=message_type)
    reply = Message(content, reply_to=instruction)
    _assign_message_id(reply)
    return wire_copy(reply)


def wire_copy(msg: Message) -> Message:
    """Copy a message as the other side receives it: through Flower's protobuf serde."""
    return message_from_proto(message_to_proto(msg))


def node_id_of(partition_id: int) -> int:
    """Return the node id the harness gives partition ``partition_id``."""
    return _NODE_ID_BASE + _NODE_ID_STRIDE * partition_id


# --- the grid -------------------------------------------------------------------------------
class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (see the module docstring).

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Number of nodes; node i gets partition-id i of num-partitions ``num_nodes``.
    run_config : Mapping
        The run config every node sees (flat; bool/int/float/str values, as in Flower).
    run_id : int
        Run id of the contexts and messages.
    on_reply : callable, optional
        Called with every reply (after serialisation), before the server sees it.
    node_configs : sequence of mappings, optional
        Extra ``--node-config`` entries of node i (e.g. an organisation's ``data-dir``).

    """

    def __init__(
        self,
        *,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, UserConfigValue],
        run_id: int = DEFAULT_RUN_ID,
        on_reply: ReplyHook | None = None,
        node_configs: Sequence[Mapping[str, UserConfigValue]] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        _check_run_config(run_config)
        self.client_app = client_app
        self.on_reply = on_reply
        self.replies: list[Message] = []
        self.contexts: dict[int, Context] = {
            node_id_of(i): Context(
                run_id=run_id,
                node_id=node_id_of(i),
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **(node_configs[i] if node_configs else {}),
                },
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(run_id=run_id)
        self._outbox: dict[str, Message] = {}
        set_task_identity(run_id=run_id)

    def set_run(self, run: Run) -> None:
        """Replace the run (the run id of the contexts stays as built)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message (deprecated in Flower; the Grid ABC still requires it)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of all nodes (all are always connected here)."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message on its node now; the reply waits for ``pull_messages``."""
        ids = []
        for msg in messages:
            _assign_message_id(msg)
            self._outbox[msg.metadata.message_id] = self._execute(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return the replies to the given message ids (each delivered once)."""
        return [self._outbox.pop(i) for i in message_ids if i in self._outbox]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every reply (execution is synchronous; timeout is unused)."""
        return self.pull_messages(self.push_messages(messages))

    def _execute(self, msg: Message) -> Message:
        """One ClientApp call on the destination node, with Flower's error semantics."""
        node_id = msg.metadata.dst_node_id
        if node_id not in self.contexts:
            raise ValueError(f"message for unknown node {node_id}; nodes: {list(self.contexts)}")
        context = self.contexts[node_id]
        received = wire_copy(msg)
        try:
            reply = self.client_app(received, context)
        except Exception as ex:  # noqa: BLE001 - as Flower: any error -> error reply
            _log.error("ClientApp on node %d raised", node_id, exc_info=ex)
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=received
            )
        if reply.metadata.reply_to_message_id != msg.metadata.message_id:
            raise ValueError(
                f"node {node_id} returned a message that is not a reply to the one it got; "
                "build it with Message(content, reply_to=message)"
            )
        self.contexts[node_id] = context_from_proto(context_to_proto(context))
        _assign_message_id(reply)
        reply = wire_copy(reply)
        self.replies.append(reply)
        if self.on_reply is not None:
            self.on_reply(reply)
        return reply


def _check_run_config(run_config: Mapping[str, UserConfigValue]) -> None:
    """Flower's run config is flat and scalar; fail here as the real one would."""
    for key, value in run_config.items():
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise TypeError(
                f"run_config[{key!r}] = {value!r}: Flower run config values are "
                "bool/int/float/str only"
            )


# --- running a federation ----------------------------------------------------------------
@dataclass
class FederationRun:
    """What a harness run produced.

    ``result`` is the strategy's ``Result`` (None when a ServerApp was driven: its main
    function returns nothing; read its files or ``server_context`` instead).
    """

    grid: InProcessGrid
    result: Result | None = None
    server_context: Context | None = None
    replies: list[Message] = field(default_factory=list)


def run_strategy(
    strategy: Strategy,
    *,
    client_app: ClientApp,
    num_nodes: int,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    run_config: Mapping[str, UserConfigValue] | None = None,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    on_reply: ReplyHook | None = None,
    node_configs: Sequence[Mapping[str, UserConfigValue]] | None = None,
) -> FederationRun:
    """Drive ``strategy.start(...)`` over ``num_nodes`` in-process nodes."""
    grid = InProcessGrid(
        client_app=client_app, num_nodes=num_nodes, run_config=run_config or {}, on_reply=on_reply
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=num_rounds,
        train_config=train_config,
        evaluate_config=evaluate_config,
    )
    return FederationRun(grid=grid, result=result, replies=list(grid.replies))


def run_server_app(
    server_app: ServerApp,
    *,
    client_app: ClientApp,
    num_nodes: int,
    run_config: Mapping[str, UserConfigValue],
    on_reply: ReplyHook | None = None,
    node_configs: Sequence[Mapping[str, UserConfigValue]] | None = None,
    run_id: int = DEFAULT_RUN_ID,
) -> FederationRun:
    """Run a real ServerApp (its ``@app.main()`` and lifespan) against in-process nodes.

    Flower calls ``server_app(grid, context)``; the ServerApp's context carries the same
    ``run_config`` as the nodes' and the SuperLink's node id, as in a real run. Each call
    builds fresh node contexts: a second call is the same nodes after a restart.
    """
    grid = InProcessGrid(
        client_app=client_app,
        num_nodes=num_nodes,
        run_config=run_config,
        on_reply=on_reply,
        node_configs=node_configs,
        run_id=run_id,
    )
    context = Context(
        run_id=grid.run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    server_app(grid, context)
    return FederationRun(grid=grid, server_context=context, replies=list(grid.replies))


def federation_config(tmp: Path, **overrides: UserConfigValue) -> dict[str, UserConfigValue]:
    """Dpfpl's run config for an in-process federation: 3 rounds, seeded noise, files in tmp.

    ``overrides`` use the run config's kebab-case keys, passed as ``**{"min-nodes": 4}``.
    """
    from dpfpl_app.config import RunConfig

    config = RunConfig(
        num_server_rounds=3,
        output_dir=str(tmp / "runs"),
        run_name="t",
        state_dir=str(tmp / "state"),
        reproducible_noise=True,
    ).to_flower()
    config.update(overrides)
    return dict(config)

