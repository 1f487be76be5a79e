"""One SecAgg+ round driven over a Flower ``Grid``: the stages between the strategy's calls.

The strategy's round is Flower's ``configure_train -> send_and_receive ->
aggregate_train``. A secure round fits it: ``key_exchange`` runs the two query stages
(setup, share keys) inside ``configure_train``; the strategy then returns the masked-input
messages, which carry the training instruction, so Flower sends them as the round's
training messages; ``aggregate`` runs the consistency and unmask exchanges inside
``aggregate_train`` and returns the sum. Nothing here knows about prompts or privacy
plans: any strategy that needs the sum of clipped client vectors (DP-FPL here, SecFPP
next) can drive it.

Dropouts: an error reply (a crashed ClientApp, a node Flower gave up on, a client that
refused the round) is left out, as the protocol expects. ``SecAggAbort`` from the
protocol ends the round; ``RoundRecord`` says at which stage and what had left the
clients by then, which is what the accounting needs (``strategy`` charges it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from dpfpl_app.secagg import AggregateResult, SecAggAbort, SecAggConfig, ServerRound, Stage
from dpfpl_app.secagg.records import (
    add_payload,
    add_purpose,
    message_type,
    message_type_for,
    read_payload,
)

Payloads = dict[int, dict[str, Any]]

# Stage codes for the round metrics (MetricRecord values are numbers): 0 = completed.
ABORT_CODES = {stage: i + 1 for i, stage in enumerate((*Stage.ORDER, "finish"))}


@dataclass
class RoundRecord:
    """What one secure round did: where it stopped, what left the clients, its traffic."""

    sampled: int
    min_survivors: int
    trained: bool = False  # masked-input messages were sent: clients trained and masked
    revealed: bool = False  # unmask messages were sent: clients revealed mask shares
    aborted_stage: str | None = None
    reason: str = ""
    result: AggregateResult | None = None
    bytes_received: int = 0  # serialised reply content, all stages
    replies: int = 0
    faults: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage


class SecureRound:
    """The server side of one round over ``grid`` (see the module docstring)."""

    def __init__(
        self,
        config: SecAggConfig,
        nodes: list[int],
        *,
        grid: Grid,
        round_: int,
        timeout: float,
        purpose: str = "prompt",
    ) -> None:
        """``purpose`` tags every message, so a client knows which sum (and so which
        config) the round is for: the prompt channel, or a SecFPP clustering phase.
        """
        self.server = ServerRound(config, nodes)
        self._purpose = purpose
        self.record = RoundRecord(
            sampled=len(nodes), min_survivors=self.server.params.min_survivors
        )
        self._grid, self._round, self._timeout = grid, round_, timeout
        self._masked_sent: float | None = None
        self._masked: list[Message] = []

    @property
    def params(self) -> Any:
        """The round's public parameters (``secagg.RoundParams``)."""
        return self.server.params

    def key_exchange(self) -> Payloads | None:
        """Setup and share-keys stages; the masked-stage payloads, or None if aborted."""
        try:
            keys = self.server.share_keys(self._exchange(Stage.SETUP, self.server.setup()))
            return self.server.collect_masked(self._exchange(Stage.SHARE_KEYS, keys))
        except SecAggAbort as err:
            self._abort(err)
            return None

    def masked_messages(
        self, payloads: Payloads, content: RecordDict, category: str = MessageType.TRAIN
    ) -> list[Message]:
        """The masked-input stage's messages: ``content`` (the training instruction) + payload.

        ``content`` is copied per node through a fresh RecordDict, never shared.
        """
        self.record.trained = True
        self._masked_sent = time.perf_counter()
        self._masked = [
            Message(
                add_payload(add_purpose(RecordDict(dict(content.items())), self._purpose), payload),
                node,
                message_type_for(Stage.COLLECT_MASKED, category),
                group_id=str(self._round),
            )
            for node, payload in payloads.items()
        ]
        return self._masked

    def run_query(self, content: RecordDict) -> AggregateResult | None:
        """A whole round driven here, the masked stage a query that trains nothing
        (SecFPP's clustering sums): the sum, or None if the round was discarded.
        """
        payloads = self.key_exchange()
        if payloads is None:
            return None
        messages = self.masked_messages(payloads, content, category=MessageType.QUERY)
        return self.aggregate(self._grid.send_and_receive(messages, timeout=self._timeout))

    def aggregate(self, masked_replies: Iterable[Message]) -> AggregateResult | None:
        """Collect the masked inputs, run the consistency (signed rounds) and unmask
        exchanges, return the sum (or None).
        """
        if self._masked_sent is not None:  # Flower sent them between our two calls
            self.record.seconds[Stage.COLLECT_MASKED] = time.perf_counter() - self._masked_sent
        try:
            unmask = self.server.survivor_list(
                self._payloads(masked_replies, Stage.COLLECT_MASKED, self._masked)
            )
            if self.server.pending == Stage.CONSISTENCY:  # signed: the survivors sign first
                unmask = self.server.unmask(self._exchange(Stage.CONSISTENCY, unmask))
            self.record.revealed = True
            result = self.server.finish(self._exchange(Stage.UNMASK, unmask))
        except SecAggAbort as err:
            self._abort(err)
            return None
        self.record.result = result
        self.record.faults = [f"node {f.node} at {f.stage}: {f.reason}" for f in result.faults]
        for fault in self.record.faults:
            log(WARNING, "secure round %d: %s", self._round, fault)
        return result

    # --- helpers -------------------------------------------------------------------------
    def _exchange(self, stage: str, payloads: Payloads) -> dict[int, dict[str, Any]]:
        """One stage: a message per node, the payloads of the nodes that answered."""
        messages = [
            Message(
                add_payload(add_purpose(RecordDict(), self._purpose), p),
                node,
                message_type(stage),
                group_id=str(self._round),
            )
            for node, p in payloads.items()
        ]
        start = time.perf_counter()
        replies = self._payloads(
            self._grid.send_and_receive(messages, timeout=self._timeout), stage, messages
        )
        self.record.seconds[stage] = time.perf_counter() - start
        log(
            INFO,
            "secure round %d: %s answered by %d of %d",
            self._round,
            stage,
            len(replies),
            len(messages),
        )
        return replies

    def _payloads(
        self, replies: Iterable[Message], stage: str, sent: list[Message]
    ) -> dict[int, dict[str, Any]]:
        """Payloads by sender; error replies, unreadable ones and silence are dropouts.

        Every dropout is logged with the node it was sent to: Flower's own error reply
        for a node it lost comes from the SuperLink, not from that node.
        """
        out: dict[int, dict[str, Any]] = {}
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        if "" in sent_to or len(sent_to) != len(sent):  # a grid that assigns no ids
            sent_to = {}
        for reply in replies:
            self.record.replies += 1
            node = sent_to.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                log(
                    WARNING,
                    "secure round %d: node %d dropped out at %s: %s",
                    self._round,
                    node,
                    stage,
                    reply.error.reason,
                )
                continue
            self.record.bytes_received += recorddict_to_proto(reply.content).ByteSize()
            try:
                out[reply.metadata.src_node_id] = read_payload(reply.content)
            except KeyError as err:
                log(
                    WARNING,
                    "secure round %d: node %d: %s",
                    self._round,
                    reply.metadata.src_node_id,
                    err,
                )
        for node in sent_to.values():  # no reply at all before the stage's timeout
            log(WARNING, "secure round %d: node %d sent no reply at %s", self._round, node, stage)
        return out

    def _abort(self, err: SecAggAbort) -> None:
        self.record.aborted_stage, self.record.reason = err.stage, err.reason
        log(
            WARNING, "secure round %d discarded at stage %s: %s", self._round, err.stage, err.reason
        )


def global_release(record: RoundRecord) -> float | None:
    """The sum the server may hold after this round, as survivors / min-survivors.

    None: no sum can be reconstructed (aborted before any mask share was revealed).
    A round aborted after the unmask messages went out is charged as a release at the
    minimum survivors (the smallest noise): the clients revealed shares, and from
    enough of them the server could have rebuilt the sum the protocol then refused.
    """
    if record.result is not None:
        return len(record.result.survivors) / record.min_survivors
    return 1.0 if record.revealed else None


def metrics_of(record: RoundRecord) -> Mapping[str, int | float]:
    """Round metrics every secure round reports (numbers only, as MetricRecord needs).

    ``<stage>-s`` is each exchange's wall time as the server saw it: in a deployment,
    mostly the ClientApp process each message starts (``benchmarks/bench_rounds.py``).
    """
    survivors = len(record.result.survivors) if record.result else 0
    return {
        "survivors": survivors,
        "secagg-aborted-stage": ABORT_CODES.get(record.aborted_stage or "", 0),
        "secagg-bytes-received": record.bytes_received,
        "secagg-replies": record.replies,
        **{f"{stage}-s": round(s, 3) for stage, s in record.seconds.items()},
    }
