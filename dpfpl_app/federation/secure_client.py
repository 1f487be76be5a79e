"""A client's answers to the secure-aggregation stages; the round's secrets in its state.

Each stage message runs ``ClientRound`` from the node's ``context.state`` and stores
its state back: the round's secrets (private keys, self-mask seed, neighbours' shares)
never leave the node except as the protocol allows (``secagg.client``), and the record
is deleted once the unmask stage has answered (or refused). The key-exchange stages
import only this module, ``secagg`` and Flower: no torch, no CLIP (in deployment each
message is a fresh process). The masked stage trains, so it imports the trainer lazily.

Budget on a discarded round. The masked stage trains first (the local step, with its
noisy carriers, updates the private prompt) and then releases the masked vector; the
trainer's counters and private state are saved as soon as the vector is built. The
client cannot know whether the server will go on to unmask a sum with it, so it counts
the step as a full release of both channels at the minimum survivors (``dp_channel``:
the client's epsilon is an upper bound of the server's). If training or masking fails
before the reply is built, nothing is saved: the step left no trace outside the
process, and the next round starts from the state before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from dpfpl_app.config import RunConfig
from dpfpl_app.federation import evaluation_sum
from dpfpl_app.federation.secure_identity import UNSIGNED_WARNING, node_identity
from dpfpl_app.method import domain_clusters
from dpfpl_app.privacy.secure_channel import config_for
from dpfpl_app.secagg import ClientRound, SecAggConfig, Stage
from dpfpl_app.secagg.records import add_payload, read_payload, read_purpose

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

STATE_KEY = "dpfpl.secagg"
PURPOSE_KEY = "dpfpl.secagg.purpose"
PROMPT, CLUSTERING = "prompt", "clustering"


def config_for_purpose(cfg: RunConfig, purpose: str, dim: int) -> SecAggConfig:
    """The SecAgg config this node agrees to for a round of ``purpose``.

    ``prompt``: the global (or domain) prompt channel with its DP noise (``secure_channel``).
    ``clustering``: SecFPP's statistics, no noise, every sampled node must survive (a
    dropout could leave a cluster's sum with fewer members than opened it), inputs
    bounded by the largest search the run config allows (``domain_clusters``).
    ``evaluation``: exact test-set counts, no noise, every sampled node (``evaluation_sum``).
    """
    if purpose == PROMPT:
        return config_for(cfg, dim)
    if purpose == evaluation_sum.EVALUATION:
        return evaluation_sum.secagg_config(dim)
    if purpose == CLUSTERING and cfg.method.clustered:
        return SecAggConfig(
            dim=dim,
            clip=domain_clusters.input_bound(cfg.max_clusters, cfg.cluster_restarts),
            scale=domain_clusters.SCALE,
            require_all=True,
        )
    raise ValueError(
        f"a secure round for {purpose!r} does not exist for method {cfg.method.value!r}: "
        "the ServerApp and this node run different configs or versions"
    )


_KEY_STAGES = {
    Stage.SETUP: ClientRound.setup,
    Stage.SHARE_KEYS: ClientRound.share_keys,
    Stage.CONSISTENCY: ClientRound.consistency,
    Stage.UNMASK: ClientRound.unmask,
}


def answer_stage(msg: Message, context: Context, cfg: RunConfig, stage: str) -> Message:
    """Setup, share-keys, consistency or unmask: no training, no torch."""
    if stage not in _KEY_STAGES:
        raise ValueError(f"{stage!r} is not a key-exchange stage")
    payload = read_payload(msg.content)
    purpose = read_purpose(msg.content, PROMPT)
    if stage == Stage.SETUP:
        context.state[PURPOSE_KEY] = ConfigRecord({"purpose": purpose})
    _check_purpose(context, purpose)
    step = _KEY_STAGES[stage]
    content = _run(context, cfg, stage, payload, lambda client: step(client, payload))
    return Message(content, reply_to=msg)


def masked_content(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    contribution: Callable[[], np.ndarray],
    purpose: str = PROMPT,
) -> RecordDict:
    """The masked-input stage's reply: ``contribution()`` trains and returns the clipped
    vector, which is quantised, noised and masked before it leaves (``ClientRound``).

    ``purpose`` is what the handler computes; the message and the round's setup must
    say the same, or a gradient could be summed under the clustering's noiseless config.
    """
    stated = read_purpose(msg.content, PROMPT)
    if stated != purpose:
        raise ValueError(
            f"a {purpose!r} masked stage got a message for {stated!r}: it drops out of this round"
        )
    _check_purpose(context, purpose)
    payload = read_payload(msg.content)
    stage = Stage.COLLECT_MASKED
    return _run(
        context, cfg, stage, payload, lambda client: client.collect_masked(payload, contribution())
    )


def _check_purpose(context: Context, purpose: str) -> None:
    """A stage must continue the round its setup began, for the same purpose."""
    started = context.state.config_records.get(PURPOSE_KEY)
    if started is not None and started["purpose"] != purpose:
        raise ValueError(
            f"this node's secure round is for {started['purpose']!r} but the message is for "
            f"{purpose!r}: it drops out of this round"
        )


def _run(
    context: Context,
    cfg: RunConfig,
    stage: str,
    payload: dict[str, Any],
    step: Callable[[ClientRound], dict[str, Any]],
) -> RecordDict:
    """Rebuild the round from the node state, run one stage, keep or erase the state."""
    client = _client(context, cfg, stage, payload)
    if stage == Stage.SETUP and client.identity is None:
        logger.warning(UNSIGNED_WARNING)
    try:
        reply = step(client)
    finally:
        if client.stage == "done" and STATE_KEY in context.state:
            del context.state[STATE_KEY]  # unmask answered or refused: forget the round
    if client.stage != "done":
        context.state[STATE_KEY] = ConfigRecord(client.to_state())
    return add_payload(RecordDict(), reply)


def _client(context: Context, cfg: RunConfig, stage: str, payload: dict[str, Any]) -> ClientRound:
    """A fresh round at setup (any stale one is replaced), else the stored one.

    The vector length is the server's word at setup (the client has not loaded the
    model); every other parameter is derived here and checked by ``ClientRound.setup``.
    The signing identity (``secure_identity``) is read from the node config each stage.
    """
    identity = node_identity(context, _purpose(context))
    if stage == Stage.SETUP:
        dim = payload.get("dim")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"setup payload has no valid 'dim' (got {dim!r})")
        config = config_for_purpose(cfg, _purpose(context), dim)
        return ClientRound(config, context.node_id, identity)
    if STATE_KEY not in context.state:
        raise RuntimeError(
            f"node {context.node_id} got stage {stage!r} without a round in progress "
            "(its setup never arrived, or the node restarted): it drops out of this round"
        )
    state: dict[str, Any] = dict(context.state.config_records[STATE_KEY])
    config = config_for_purpose(cfg, _purpose(context), int(state["dim"]))
    return ClientRound.from_state(config, context.node_id, state, identity)


def _purpose(context: Context) -> str:
    record = context.state.config_records.get(PURPOSE_KEY)
    return PROMPT if record is None else str(record["purpose"])
