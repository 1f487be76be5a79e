"""What the server accepts from a client, and which node a refused reply came from.

A privacy auditor looks here for the server's side of the protocol: every reply is
parsed by ``wire`` against what was sent (the global prompt's shape and dtype, whether
DP is on), a node counts once per round (a duplicate would double its weight and its
sensitivity), and every gradient is re-clipped to C before the mean, so a client that
skipped clipping moves ``p_G`` by at most ``server_lr * C / N``.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import Message
from flwr.common.logger import log

from dpfpl_app.federation import wire
from dpfpl_app.privacy import mechanics

SUSPICIOUS_FACTOR = 2.0
"""A Poisson batch larger than B makes an honest client's clipped sum / B exceed C a
little; far beyond that a client skipped clipping (or is hostile)."""


def node_of(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for: the destination of the message it replies to.

    A reply's ``src_node_id`` is the SuperLink's (1) when Flower itself stands in for a
    node that died or whose reply was lost, so the sent message decides.
    """
    asked = reply.metadata.reply_to_message_id
    for message in sent if asked else ():
        if message.metadata.message_id == asked:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def refuse(phase: str, round_: int, reply: Message, sent: list[Message], reason: str) -> None:
    log(WARNING, "%s round %d: refused reply from node %d: %s", phase, round_,
        node_of(reply, sent), reason)


def accept_train_replies(
    replies: list[Message],
    sent: list[Message],
    round_: int,
    *,
    prompt: torch.Tensor,
    dp_on: bool,
    rate_bound: float = 1.0,
    folded: bool = False,
) -> list[wire.TrainReply]:
    """The replies that pass the protocol checks; every refusal is logged with its node.

    A DP reply whose declared rate exceeds ``rate_bound`` (the run's ``max-sample-rate``)
    is refused: that node sampled more often than the noise is sized for. ``folded``: the
    messages asked for the previous round's evaluation too (``accept_evaluate_replies``
    checks that part).
    """
    accepted: list[wire.TrainReply] = []
    seen: set[int] = set()
    for msg in replies:
        try:
            reply = wire.parse_train_reply(
                msg, expected_shape=tuple(prompt.shape), expected_dtype=prompt.dtype,
                dp_on=dp_on, folded=folded,
            )
            if reply.node_id in seen:
                raise wire.InvalidReply("duplicate reply: a node counts once per round")
            if reply.sample_rate is not None and reply.sample_rate > rate_bound:
                raise wire.InvalidReply(
                    f"declared sample rate {reply.sample_rate:g} is above the run's bound "
                    f"max-sample-rate={rate_bound:g}: the noise does not cover that node"
                )
        except wire.InvalidReply as err:
            refuse("train", round_, msg, sent, str(err))
            continue
        seen.add(reply.node_id)
        accepted.append(reply)
    return accepted


def accept_evaluate_replies(
    replies: list[Message], sent: list[Message], round_: int, *, folded: bool = False
) -> list[wire.EvaluateReply]:
    """The evaluations that pass the checks; ``folded``: those inside the next round's
    train replies (fold-evaluation), for round ``round_``.
    """
    parse = wire.parse_folded_evaluation if folded else wire.parse_evaluate_reply
    accepted: list[wire.EvaluateReply] = []
    seen: set[int] = set()
    for msg in replies:
        try:
            reply = parse(msg)
            if reply.node_id in seen:
                raise wire.InvalidReply("duplicate reply: a node counts once per round")
            seen.add(reply.node_id)
            accepted.append(reply)
        except wire.InvalidReply as err:
            refuse("evaluate", round_, msg, sent, str(err))
    return accepted


def clipped_mean(accepted: list[wire.TrainReply], clip_norm: float, round_: int) -> torch.Tensor:
    """Unweighted mean of the replies, each re-clipped to C (float64).

    Nothing about an individual norm is logged or counted (it is a statistic of the
    client's batch before any noise), except a warning for a reply no clipped batch
    could produce.
    """
    grads = torch.stack([r.grad.to(torch.float64) for r in accepted])  # (N, n_ctx, d)
    hostile = grads.flatten(1).norm(dim=1) > SUSPICIOUS_FACTOR * clip_norm  # (N,)
    for reply, flagged in zip(accepted, hostile.tolist(), strict=True):
        if flagged:
            log(WARNING, "train round %d: node %d sent a gradient no clipped batch can "
                "produce (norm > %g x clip-norm); re-clipped on the server",
                round_, reply.node_id, SUSPICIOUS_FACTOR)
    return mechanics.clipped_sum(grads, clip_norm) / len(accepted)
