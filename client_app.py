"""dpfpl ClientApp: wires Flower messages to a client's trainer; the method is in dpfpl_app."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpfpl_app.config import RunConfig
from dpfpl_app.federation.secure_client import answer_stage, masked_content
from dpfpl_app.secagg import Stage

if TYPE_CHECKING:
    from dpfpl_app.method.client_trainer import ClientTrainer

app = ClientApp()


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
    from dpfpl_app.service.logs import route_app_logs

    route_app_logs()
    trainer = build_trainer(cfg, context)
    content = answer(trainer, msg)
    save_state(trainer, cfg, context)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the private prompt, reply with the clipped global-prompt gradient."""
    cfg = RunConfig.from_flower(context.run_config)  # a bad key stops here, before torch
    from dpfpl_app.federation.client_messages import answer_train

    return _handle(msg, context, cfg, answer_train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local and neighbour accuracy of this client's personalised prompt."""
    cfg = RunConfig.from_flower(context.run_config)  # a bad key stops here, before torch
    from dpfpl_app.federation.client_messages import answer_evaluate

    return _handle(msg, context, cfg, answer_evaluate)


# --- secure aggregation (aggregation = "secure"): one handler per stage -----------------
# The key-exchange stages import no torch and load no model: in deployment each message
# is a fresh process (dpfpl_app.federation.secure_client).


@app.query(Stage.SETUP)
def secagg_setup(msg: Message, context: Context) -> Message:
    """Check the round's parameters against this node's config; make the round keys."""
    return answer_stage(msg, context, RunConfig.from_flower(context.run_config), Stage.SETUP)


@app.query(Stage.SHARE_KEYS)
def secagg_share_keys(msg: Message, context: Context) -> Message:
    """Share the mask secrets among the neighbours, encrypted to each."""
    return answer_stage(msg, context, RunConfig.from_flower(context.run_config), Stage.SHARE_KEYS)


@app.train(Stage.COLLECT_MASKED)
def secagg_collect_masked(msg: Message, context: Context) -> Message:
    """Train one round; reply with the clipped gradient quantised, noised and masked."""
    cfg = RunConfig.from_flower(context.run_config)  # a bad key stops here, before torch
    from dpfpl_app.federation.client_messages import secure_contribution

    def answer(trainer: ClientTrainer, message: Message) -> RecordDict:
        return masked_content(message, context, cfg, lambda: secure_contribution(trainer, message))

    return _handle(msg, context, cfg, answer)


@app.query(Stage.UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Reveal the shares the protocol allows, then forget the round's secrets."""
    return answer_stage(msg, context, RunConfig.from_flower(context.run_config), Stage.UNMASK)
