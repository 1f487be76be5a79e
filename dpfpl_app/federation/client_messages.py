"""A client's answer to each message, whatever built its trainer.

The ClientApp builds the trainer from the node's state; the membership audit builds it
from data it chooses. Both must answer exactly as the protocol says, so the answer is
written once here: read the broadcast global prompt, train or evaluate, and put only
the clipped global-prompt gradient and scalar metrics into the reply (``wire``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message, RecordDict

from dpfpl_app.federation import wire
from dpfpl_app.method.client_trainer import ClientTrainer
from dpfpl_app.privacy import mechanics


def answer_train(trainer: ClientTrainer, msg: Message) -> RecordDict:
    """One round of local training; the reply content for the server."""
    prompt = wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD])
    server_round = int(msg.content[wire.CONFIG_RECORD][wire.SERVER_ROUND])
    outcome = trainer.train_round(prompt, server_round)
    return wire.train_reply_content(
        grad=outcome.global_grad, train_loss=outcome.loss, dp_on=trainer.cfg.dp_on
    )


def answer_evaluate(trainer: ClientTrainer, msg: Message) -> RecordDict:
    """Local and neighbour accuracy of the personalised prompt with the broadcast p_G."""
    metrics = trainer.evaluate(wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD]))
    return wire.evaluate_reply_content(
        local_acc=metrics["local-acc"],
        neighbour_acc=metrics["neighbour-acc"],
        zeroshot_local_acc=metrics["zeroshot-local-acc"],
        zeroshot_neighbour_acc=metrics["zeroshot-neighbour-acc"],
        local_examples=int(metrics["local-examples"]),
        neighbour_examples=int(metrics["neighbour-examples"]),
        partition_id=trainer.partition_id,
    )


def secure_contribution(trainer: ClientTrainer, msg: Message) -> np.ndarray:
    """One round of local training; the global-prompt gradient projected onto the C ball.

    The projection keeps the per-sample sensitivity C/B (it is 1-Lipschitz) and puts the
    vector inside the SecAgg input bound even when the Poisson batch exceeded B. No
    noise here: the client's Skellam share is added after quantisation (``secagg``).
    """
    prompt = wire.read_global_prompt(msg.content[wire.ARRAYS_RECORD])
    server_round = int(msg.content[wire.CONFIG_RECORD][wire.SERVER_ROUND])
    outcome = trainer.train_round(prompt, server_round)
    bounded = mechanics.clip_tensor(outcome.global_grad.double(), trainer.cfg.clip_norm)
    return bounded.flatten().numpy()
