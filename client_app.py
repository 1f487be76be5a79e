"""dpfpl ClientApp: wires Flower messages to a client's trainer; the method is in dpfpl_app.

In a deployment Flower starts a process for every message, and with ``node-worker=true``
that process only hands the message to the node's worker. So this module imports
Flower, the worker link and the stage names, nothing else: every handler imports what
it needs when it runs (``tests/test_secure_imports.py`` keeps it so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpfpl_app.federation.node_worker_link import delegate_to_worker
from dpfpl_app.secagg import Stage

if TYPE_CHECKING:
    from dpfpl_app.config import Aggregation, RunConfig
    from dpfpl_app.method.client_trainer import ClientTrainer

# node-worker=true in a node's config: every message runs in the node's long-lived worker
# (the same handlers below), not in this short-lived process.
app = ClientApp(mods=[delegate_to_worker])

# Node config: an organisation that will not let the server see its clipped gradients
# sets this on its SuperNode; its ClientApp then refuses every plain round.
REQUIRE_SECURE = "require-secure-aggregation"


def run_config(context: Context, mode: Aggregation) -> RunConfig:
    """The run config with ``auto`` resolved to the mode the server's message states.

    A bad key stops here, before torch. So does a plain round on a node whose operator
    requires secure aggregation, and a mode that contradicts an explicit run config.
    """
    from dpfpl_app.config import Aggregation, ConfigError, RunConfig

    cfg = RunConfig.from_flower(context.run_config).resolve_aggregation(mode)
    if cfg.aggregation is not mode:  # auto stays plain for a method that shares nothing
        raise ConfigError(
            f"method {cfg.method.value!r} shares no global prompt, so it takes part in no "
            f"{mode.value} round: the ServerApp and this node disagree on the run"
        )
    policy = str(context.node_config.get(REQUIRE_SECURE, "false")).lower()
    if policy not in {"true", "false"}:
        raise ConfigError(
            f"node config {REQUIRE_SECURE}={context.node_config[REQUIRE_SECURE]!r}: "
            "use true or false (start the SuperNode with a corrected --node-config)"
        )
    if policy == "true" and cfg.aggregation is Aggregation.PLAIN and cfg.method.has_global:
        raise ConfigError(
            f"this node's operator requires secure aggregation (node config {REQUIRE_SECURE}"
            f"=true) and this run is plain: the server would see this node's clipped "
            "gradient. Run with aggregation='auto' or 'secure'"
        )
    return cfg


def message_config(msg: Message, context: Context) -> RunConfig:
    """``run_config`` for a train or evaluate message, which states the run's mode."""
    from dpfpl_app.config import RunConfig

    RunConfig.from_flower(context.run_config)  # a bad key stops here, before torch
    from dpfpl_app.federation.wire import read_aggregation

    return run_config(context, read_aggregation(msg.content))


def _handle(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    answer: Callable[[ClientTrainer, Message], RecordDict],
) -> Message:
    """Restore the node's trainer, answer, keep the state and the exported prompt, reply.

    The state is saved before replying, so a crash never loses a round the server has
    counted; saving after evaluation too exports the prompt just evaluated (latest p_G
    + local), the one worth releasing.
    """
    from dpfpl_app.federation.client_node import build_trainer, save_state
    from dpfpl_app.federation.message_timing import MessageTimes
    from dpfpl_app.service.logs import route_app_logs

    times = MessageTimes()
    with times.part("imports"):
        route_app_logs()  # imports opacus, and with it torch
    with times.part("model and features"):
        trainer = build_trainer(cfg, context)
    with times.part("compute"):
        content = answer(trainer, msg)
    with times.part("state saved"):
        save_state(trainer, cfg, context)
    logging.getLogger("dpfpl_app.message").info(times.line(msg.metadata.message_type))
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the private prompt, reply with the clipped global-prompt gradient."""
    cfg = message_config(msg, context)
    from dpfpl_app.federation.client_messages import answer_train

    return _handle(msg, context, cfg, answer_train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local and neighbour accuracy of this client's personalised prompt."""
    from dpfpl_app.config import Aggregation, ConfigError

    cfg = message_config(msg, context)
    if cfg.aggregation is Aggregation.SECURE:
        raise ConfigError(
            "a secure run evaluates through a secure sum of counts; this node does not send "
            "its own accuracies and example counts in clear (the ServerApp is not this "
            "version of dpfpl, or not honest)"
        )
    from dpfpl_app.federation.client_messages import answer_evaluate

    return _handle(msg, context, cfg, answer_evaluate)


# --- secure aggregation (aggregation = "secure"): one handler per stage -----------------
# The key-exchange stages import no torch and load no model: in deployment each message
# is a fresh process (dpfpl_app.federation.secure_client).


def secure_config(context: Context) -> RunConfig:
    """``run_config`` of a secure-round message (every stage is one)."""
    from dpfpl_app.config import Aggregation

    return run_config(context, Aggregation.SECURE)


def _answer_stage(msg: Message, context: Context, stage: str) -> Message:
    cfg = secure_config(context)
    from dpfpl_app.federation.secure_client import answer_stage

    return answer_stage(msg, context, cfg, stage)


@app.query(Stage.SETUP)
def secagg_setup(msg: Message, context: Context) -> Message:
    """Check the round's parameters against this node's config; make the round keys."""
    return _answer_stage(msg, context, Stage.SETUP)


@app.query(Stage.SHARE_KEYS)
def secagg_share_keys(msg: Message, context: Context) -> Message:
    """Share the mask secrets among the neighbours, encrypted to each."""
    return _answer_stage(msg, context, Stage.SHARE_KEYS)


@app.train(Stage.COLLECT_MASKED)
def secagg_collect_masked(msg: Message, context: Context) -> Message:
    """Train one round; reply with the clipped gradient quantised, noised and masked."""
    cfg = secure_config(context)
    from dpfpl_app.federation.client_messages import secure_contribution
    from dpfpl_app.federation.secure_client import masked_content

    def answer(trainer: ClientTrainer, message: Message) -> RecordDict:
        return masked_content(message, context, cfg, lambda: secure_contribution(trainer, message))

    return _handle(msg, context, cfg, answer)


@app.evaluate(Stage.COLLECT_MASKED)
def secure_evaluate_masked(msg: Message, context: Context) -> Message:
    """Evaluate; add only the counts, masked, to the secure sum (figures stay on the node)."""
    cfg = secure_config(context)
    from dpfpl_app.federation.client_messages import evaluation_contribution
    from dpfpl_app.federation.client_node import state_directory
    from dpfpl_app.federation.evaluation_sum import EVALUATION
    from dpfpl_app.federation.secure_client import masked_content

    def answer(trainer: ClientTrainer, message: Message) -> RecordDict:
        directory = state_directory(cfg, context, trainer.partition_id)
        return masked_content(
            message, context, cfg, lambda: evaluation_contribution(trainer, message, directory),
            purpose=EVALUATION,
        )

    return _handle(msg, context, cfg, answer)


@app.query(Stage.COLLECT_MASKED)
def secfpp_cluster_masked(msg: Message, context: Context) -> Message:
    """SecFPP clustering: reply with this node's statistics, quantised and masked."""
    cfg = secure_config(context)
    from dpfpl_app.federation.client_messages import cluster_contribution
    from dpfpl_app.federation.client_node import build_trainer, save_state
    from dpfpl_app.federation.secure_client import CLUSTERING, masked_content
    from dpfpl_app.service.logs import route_app_logs

    route_app_logs()
    trainer = build_trainer(cfg, context)  # nothing trained
    releases = trainer.released_summary is None  # the summary's one noised draw is now
    content = masked_content(
        msg, context, cfg, lambda: cluster_contribution(trainer, msg), purpose=CLUSTERING
    )
    if releases:  # kept before the reply leaves: a restart reuses it, never redraws
        save_state(trainer, cfg, context)
    return Message(content, reply_to=msg)


@app.query(Stage.CONSISTENCY)
def secagg_consistency(msg: Message, context: Context) -> Message:
    """Sign the survivor list the server shows (the malicious-server variant's check)."""
    return _answer_stage(msg, context, Stage.CONSISTENCY)


@app.query(Stage.UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Reveal the shares the protocol allows, then forget the round's secrets."""
    return _answer_stage(msg, context, Stage.UNMASK)
