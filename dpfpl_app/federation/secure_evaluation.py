"""A secure run's evaluation: one SecAgg+ sum of the sampled nodes' counts (server side).

The server sends the round's prompt through a secure round whose masked stage is an
evaluate message: each node evaluates, keeps its own figures (``evaluation_sum``), and
adds only its counts to the sum. The server learns the sum and nothing per node, and
reports the federation-wide accuracies it gives (correct / examples over the sample),
and the mean over the sampled nodes of their harmonic means (``evaluation_sum``).

A masked reply that carries anything beyond its masked counts (a ``metrics`` record of
per-node figures, say) is refused as a fault and left out; so is its node from the
round's later attempts. Every sampled node must be in the sum (``require_all``): a
dropout or a refusal discards it, and the evaluation is asked again with a fresh sample
up to ``ATTEMPTS`` times, then reported as missing. No figure is ever released from
fewer nodes than were sampled, and never from fewer than three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from dpfpl_app.federation import evaluation_sum, reply_checks, wire
from dpfpl_app.federation.secure_round import SecureRound
from dpfpl_app.secagg.records import PAYLOAD_ARRAYS, PAYLOAD_CONFIG

ATTEMPTS = 3  # a discarded evaluation sum is asked this many times in all
MIN_NODES = 3  # a sum of two reveals each input to the other (as for training)
EVAL_ATTEMPTS = "eval-attempts"  # round metric: secure sums the evaluation took
MASKED_RECORDS = frozenset({PAYLOAD_CONFIG, PAYLOAD_ARRAYS})
WEIGHTED = {  # each ratio of the sum -> the plain run's example-weighted twin (the same)
    wire.LOCAL_ACC: wire.LOCAL_ACC_WEIGHTED,
    wire.NEIGHBOUR_ACC: wire.NEIGHBOUR_ACC_WEIGHTED,
    wire.ZEROSHOT_LOCAL_ACC: wire.ZEROSHOT_LOCAL_ACC_WEIGHTED,
    wire.ZEROSHOT_NEIGHBOUR_ACC: wire.ZEROSHOT_NEIGHBOUR_ACC_WEIGHTED,
    wire.PRIOR_LOCAL_ACC: wire.PRIOR_LOCAL_ACC_WEIGHTED,
    wire.PRIOR_NEIGHBOUR_ACC: wire.PRIOR_NEIGHBOUR_ACC_WEIGHTED,
    wire.ALL_ACC: wire.ALL_ACC_WEIGHTED,
    wire.ZEROSHOT_ALL_ACC: wire.ZEROSHOT_ALL_ACC_WEIGHTED,
    wire.PRIOR_ALL_ACC: wire.PRIOR_ALL_ACC_WEIGHTED,
}
HARMONIC = (wire.HARMONIC_ACC, wire.ZEROSHOT_HARMONIC_ACC, wire.PRIOR_HARMONIC_ACC)
"""Means over the sampled nodes of their harmonic means: as in a plain run, no twin."""
SECURE_EVALUATION_NOTE = (
    "secure evaluation: each node adds its counts of correct predictions and test examples "
    "to a SecAgg+ sum over every sampled node; the server learns only the sums, so every "
    "accuracy here is federation-wide, sum of correct / sum of examples (the example-"
    "weighted mean over clients; a plain run's local-acc is the unweighted mean). The "
    "harmonic means (harmonic-acc and its zero-shot and class-prior references) are, as "
    "in a plain run, the mean over clients of each client's own, summed in fixed point. "
    "Each node's own figures are in evaluation.jsonl in its state directory"
)


@dataclass(frozen=True)
class EvaluationOutcome:
    """What a secure evaluation released: federation-wide figures, or none (missing)."""

    figures: dict[str, float]  # empty when no sum was released
    nodes: int  # nodes in the released sum (0: none)
    sampled: int  # nodes sampled for the last attempt
    attempts: int
    refused: list[int] = field(default_factory=list)  # nodes refused for a fault

    def metrics(self) -> dict[str, float | int]:
        """The round's evaluation metrics: counts of nodes, never a node's figure."""
        ratios = {key: self.figures[key] for key in WEIGHTED if key in self.figures}
        return {
            wire.EVAL_ACCEPTED: self.nodes,
            wire.EVAL_REJECTED: self.sampled - self.nodes,
            EVAL_ATTEMPTS: self.attempts,
            **ratios,
            **{WEIGHTED[key]: value for key, value in ratios.items()},
            **{key: self.figures[key] for key in HARMONIC if key in self.figures},
        }


def run_secure_evaluation(
    sample: Callable[[], list[int]],
    content: RecordDict,
    *,
    grid: Grid,
    round_: int,
    timeout: float,
) -> EvaluationOutcome:
    """Evaluate ``content``'s prompt over ``sample()`` through a secure sum (module docstring).

    ``sample`` draws the round's nodes (called again for each attempt); ``content`` is
    what a plain evaluate message would carry (the prompt and the round's config).
    """
    refused: list[int] = []
    nodes: list[int] = []
    for attempt in range(1, ATTEMPTS + 1):
        nodes = [node for node in sample() if node not in refused]
        if len(nodes) < MIN_NODES:
            log(WARNING, "evaluate round %d: %d node(s) left to sample, a secure sum needs %d",
                round_, len(nodes), MIN_NODES)
            break
        secure = SecureRound(
            evaluation_sum.secagg_config(evaluation_sum.DIM), nodes, grid=grid, round_=round_,
            timeout=timeout, purpose=evaluation_sum.EVALUATION,
        )
        result = None
        payloads = secure.key_exchange()
        if payloads is not None:
            sent = secure.masked_messages(payloads, content, category=MessageType.EVALUATE)
            kept = []
            for reply in grid.send_and_receive(sent, timeout=timeout):
                if _carries_more_than_counts(reply, sent, round_):
                    refused.append(reply_checks.node_of(reply, sent))
                else:
                    kept.append(reply)
            result = secure.aggregate(kept)
        if result is not None and len(result.survivors) == len(nodes):
            figures = evaluation_sum.accuracies(result.integer_total)
            return EvaluationOutcome(figures, len(nodes), len(nodes), attempt, refused)
        log(WARNING, "evaluate round %d: secure sum discarded (attempt %d of %d): %s", round_,
            attempt, ATTEMPTS, secure.record.reason or "a sampled node is missing from it")
    log(WARNING, "evaluate round %d: no evaluation sum released; the round's evaluation is "
        "reported as missing (check the nodes' logs)", round_)
    return EvaluationOutcome({}, 0, len(nodes), attempt, refused)


def _carries_more_than_counts(reply: Message, sent: list[Message], round_: int) -> bool:
    """Whether a masked evaluate reply carries records beyond its masked counts (logged)."""
    if reply.has_error() or not reply.has_content():
        return False  # a dropout: the secure round leaves it out and logs it
    extra = sorted(set(reply.content.keys()) - MASKED_RECORDS)
    if not extra:
        return False
    reply_checks.refuse(
        "evaluate", round_, reply, sent,
        f"fault: a secure evaluate reply carries records {extra} beyond its masked counts "
        "(per-node figures never reach the server in a secure run)",
    )
    return True
