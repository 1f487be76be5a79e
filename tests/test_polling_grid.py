"""The windowed ``send_and_receive``: how many messages are in flight, and what comes back.

``HeldGrid`` is a test double for the transport only (a Flower grid's push / pull),
since the unit under test is the window: its nodes answer the oldest outstanding
messages, ``per_pull`` of them at each pull, so a reply takes a few pulls, as it does
when a simulation's actors are busy. Some nodes never answer, some answer with an error
as Flower does for a node it lost, and an unknown node is refused at push (no id), as
Flower's in-memory grid does.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from dpfpl_app.config import ConfigError, RunConfig
from dpfpl_app.federation.polling_grid import PollingGrid, responsive, window_size
from tests.flower_harness import make_instruction, set_task_identity, wire_copy

RUN_ID = 77


class HeldGrid(Grid):
    """Replies wait until enough pulls have passed (see the module docstring)."""

    def __init__(
        self,
        nodes: Iterable[int],
        *,
        per_pull: int = 1,
        silent: Iterable[int] = (),
        failing: Iterable[int] = (),
    ) -> None:
        self.nodes = set(nodes)
        self.per_pull = per_pull
        self.silent, self.failing = set(silent), set(failing)
        self.outstanding: dict[str, Message] = {}  # pushed, reply not yet pulled
        self.ready: dict[str, Message] = {}
        self.pushed: list[int] = []  # destination of every accepted message, in order
        self.most_in_flight = 0
        self._run = Run.create_empty(run_id=RUN_ID)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.nodes:
                continue  # refused, as a SuperLink refuses an unknown destination
            stamped = make_instruction(msg.content, dst_node_id=msg.metadata.dst_node_id)
            msg.metadata.__dict__["_message_id"] = stamped.metadata.message_id
            self.outstanding[msg.metadata.message_id] = msg
            self.pushed.append(msg.metadata.dst_node_id)
            ids.append(msg.metadata.message_id)
        self.most_in_flight = max(self.most_in_flight, len(self.outstanding))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        answerable = [m for i, m in self.outstanding.items()
                      if i not in self.ready and m.metadata.dst_node_id not in self.silent]
        for msg in answerable[: self.per_pull]:
            self.ready[msg.metadata.message_id] = self._answer(msg)
        out = [self.ready.pop(i) for i in list(message_ids) if i in self.ready]
        for reply in out:
            del self.outstanding[reply.metadata.reply_to_message_id]
        return out

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node in self.failing:
            reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "node went offline"), reply_to=msg)
        else:
            reply = Message(RecordDict({"c": ConfigRecord({"node": node})}), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = f"reply-{msg.metadata.message_id}"
        return wire_copy(reply)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("the window sends through push / pull, not the grid's own loop")

    # the rest of the Grid interface, unused by the window
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.nodes)


def _messages(nodes: Iterable[int]) -> list[Message]:
    set_task_identity(run_id=RUN_ID)
    return [Message(RecordDict(), node, "train") for node in nodes]


def _answered(replies: Iterable[Message]) -> list[int]:
    return sorted(r.content["c"]["node"] for r in replies if not r.has_error())


def test_window_keeps_at_most_that_many_messages_in_flight_and_returns_every_reply() -> None:
    nodes = range(1, 21)
    transport = HeldGrid(nodes, per_pull=2)
    sent = _messages(nodes)

    replies = list(PollingGrid(transport, interval=0.0, window=3).send_and_receive(sent))

    assert transport.most_in_flight == 3
    assert _answered(replies) == list(nodes)
    assert {r.metadata.reply_to_message_id for r in replies} == {
        m.metadata.message_id for m in sent
    }
    assert transport.pushed == list(nodes)  # in the order given


def test_without_a_window_every_message_is_pushed_at_once() -> None:
    nodes = range(1, 21)
    transport = HeldGrid(nodes)

    replies = PollingGrid(transport, interval=0.0).send_and_receive(_messages(nodes))

    assert transport.most_in_flight == 20
    assert _answered(replies) == list(nodes)


def test_error_replies_pass_through_and_refused_messages_do_not_block() -> None:
    transport = HeldGrid(range(1, 9), failing={4})
    sent = _messages([*range(1, 9), 999])  # 999: no such node, refused at push

    replies = list(PollingGrid(transport, interval=0.0, window=2).send_and_receive(sent))

    errors = [r for r in replies if r.has_error()]
    assert [e.error.code for e in errors] == [ErrorCode.NODE_UNAVAILABLE]
    assert errors[0].metadata.reply_to_message_id == sent[3].metadata.message_id
    assert _answered(replies) == [1, 2, 3, 5, 6, 7, 8]


def test_timeout_returns_what_arrived_and_a_silent_node_keeps_only_its_own_slot() -> None:
    transport = HeldGrid(range(1, 11), silent={2})

    replies = PollingGrid(transport, interval=0.001, window=2).send_and_receive(
        _messages(range(1, 11)), timeout=0.05
    )

    assert _answered(replies) == [1, 3, 4, 5, 6, 7, 8, 9, 10]
    assert transport.most_in_flight == 2


def test_timeout_never_sends_what_the_window_still_held() -> None:
    transport = HeldGrid(range(1, 11), silent={1, 2})

    replies = PollingGrid(transport, interval=0.001, window=2).send_and_receive(
        _messages(range(1, 11)), timeout=0.05
    )

    assert list(replies) == []
    assert transport.pushed == [1, 2]


def test_window_settings() -> None:
    assert window_size("off") is None
    assert window_size(5) == 5
    assert window_size("auto") >= 2
    transport = HeldGrid([1])
    assert responsive(transport, "off") is transport
    windowed = responsive(transport, 7)
    assert isinstance(windowed, PollingGrid) and windowed.window == 7
    with pytest.raises(ValueError, match="window"):
        PollingGrid(transport, window=0)


@pytest.mark.parametrize("value", [0, -1, True, "some"])
def test_message_window_config_refuses_what_is_not_a_window(value: object) -> None:
    with pytest.raises(ConfigError, match="message-window"):
        RunConfig.from_flower({"message-window": value})
