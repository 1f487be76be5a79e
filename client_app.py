"""dpfpl ClientApp: wires Flower messages to a client's trainer; the method is in dpfpl_app."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dpfpl_app.client_messages import answer_evaluate, answer_train
from dpfpl_app.client_node import build_trainer, save_state
from dpfpl_app.config import RunConfig
from dpfpl_app.prompt_export import broadcast_epsilon

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the private prompt, reply with the clipped global-prompt gradient."""
    cfg = RunConfig.from_flower(context.run_config)
    trainer = build_trainer(cfg, context)
    content = answer_train(trainer, msg)
    # kept (and the prompt exported) before replying: a crash never loses a round the
    # server has already counted
    save_state(trainer, cfg, context, broadcast_epsilon=broadcast_epsilon(msg))
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local and neighbour accuracy of this client's personalised prompt."""
    cfg = RunConfig.from_flower(context.run_config)
    trainer = build_trainer(cfg, context)
    content = answer_evaluate(trainer, msg)
    # the prompt just evaluated (latest p_G + local) is the one worth releasing
    save_state(trainer, cfg, context, broadcast_epsilon=broadcast_epsilon(msg))
    return Message(content, reply_to=msg)
