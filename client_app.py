"""dpfpl ClientApp: wires Flower messages to a client's trainer; the method is in dpfpl_app."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dpfpl_app import wire
from dpfpl_app.client_node import build_trainer, save_state
from dpfpl_app.config import RunConfig

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the private prompt, reply with the clipped global-prompt gradient."""
    cfg = RunConfig.from_flower(context.run_config)
    trainer = build_trainer(cfg, context)
    prompt = wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD])
    server_round = int(msg.content[wire.CONFIG_RECORD][wire.SERVER_ROUND])
    outcome = trainer.train_round(prompt, server_round)
    save_state(trainer, cfg, context)
    content = wire.train_reply_content(
        grad=outcome.global_grad,
        num_examples=trainer.data.num_train,
        train_loss=outcome.loss,
        sample_rate=outcome.sample_rate,
        eps_local=outcome.eps_local,
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local and neighbour accuracy of this client's personalised prompt."""
    cfg = RunConfig.from_flower(context.run_config)
    trainer = build_trainer(cfg, context)
    metrics = trainer.evaluate(wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD]))
    content = wire.evaluate_reply_content(
        local_acc=metrics["local-acc"],
        neighbour_acc=metrics["neighbour-acc"],
        local_examples=int(metrics["local-examples"]),
        neighbour_examples=int(metrics["neighbour-examples"]),
    )
    return Message(content, reply_to=msg)
