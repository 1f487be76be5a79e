"""dpfpl ClientApp: wires Flower messages to a client's trainer; the method is in dpfpl_app."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpfpl_app.config import RunConfig

if TYPE_CHECKING:
    from dpfpl_app.client_trainer import ClientTrainer

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
    from dpfpl_app.client_node import build_trainer, save_state
    from dpfpl_app.logs import route_app_logs

    route_app_logs()
    trainer = build_trainer(cfg, context)
    content = answer(trainer, msg)
    save_state(trainer, cfg, context)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the private prompt, reply with the clipped global-prompt gradient."""
    cfg = RunConfig.from_flower(context.run_config)  # a bad key stops here, before torch
    from dpfpl_app.client_messages import answer_train

    return _handle(msg, context, cfg, answer_train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local and neighbour accuracy of this client's personalised prompt."""
    cfg = RunConfig.from_flower(context.run_config)  # a bad key stops here, before torch
    from dpfpl_app.client_messages import answer_evaluate

    return _handle(msg, context, cfg, answer_evaluate)
