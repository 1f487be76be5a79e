"""A client's answer to each message, whatever built its trainer.

The ClientApp builds the trainer from the node's state; the membership audit builds it
from data it chooses. Both must answer exactly as the protocol says, so the answer is
written once here: read the broadcast global prompt, train or evaluate, and put only
the clipped global-prompt gradient and scalar metrics into the reply (``wire``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Message, RecordDict

from dpfpl_app.config import ConfigError
from dpfpl_app.federation import domain_wire, evaluation_sum, wire
from dpfpl_app.federation.secure_clustering import CLUSTER_ARRAYS, CLUSTER_RECORD
from dpfpl_app.method import domain_clusters
from dpfpl_app.method.client_trainer import ClientTrainer
from dpfpl_app.privacy import mechanics


def shared_prompt(trainer: ClientTrainer, msg: Message) -> tuple[torch.Tensor, int, int]:
    """The broadcast prompt this client uses, its cluster and the number of clusters.

    One global prompt: cluster 0 of 1. SecFPP: the domain prompt of the centroid nearest
    this client's released (noised) summary, chosen here and never told to anyone; a
    function of that release and the public broadcast only (post-processing).
    """
    arrays = msg.content[wire.ARRAYS_RECORD]
    if not trainer.cfg.method.clustered:
        return wire.read_global_prompt(arrays), 0, 1
    prompts, centroids = domain_wire.read_domains(arrays)
    cluster = domain_wire.own_cluster(trainer.domain_point(), centroids)
    return prompts[cluster], cluster, prompts.shape[0]


def answer_train(trainer: ClientTrainer, msg: Message) -> RecordDict:
    """One round of local training; the reply content for the server.

    With fold-evaluation the message may ask for the previous round's evaluation first:
    the same prompt and the same local state an evaluate message would have met.
    """
    config = msg.content[wire.CONFIG_RECORD]
    evaluation = None
    if wire.EVALUATE_FIRST in config:
        if not trainer.cfg.fold_evaluation:
            raise ConfigError(
                "the server asks for a folded evaluation, but this node's run config has "
                "fold-evaluation=false: the ServerApp and this node disagree on the run"
            )
        evaluation = answer_evaluate(trainer, msg)
    prompt, _, _ = shared_prompt(trainer, msg)
    outcome = trainer.train_round(prompt, int(config[wire.SERVER_ROUND]))
    content = wire.train_reply_content(
        grad=outcome.global_grad,
        train_loss=outcome.loss,
        dp_on=trainer.cfg.dp_on,
        sample_rate=trainer.sample_rate,
    )
    return content if evaluation is None else wire.fold_evaluation(content, evaluation)


def answer_evaluate(trainer: ClientTrainer, msg: Message) -> RecordDict:
    """Local and neighbour accuracy of the personalised prompt with the broadcast p_G,
    and of the zero-shot and class-prior references on the same images.
    """
    metrics = trainer.evaluate(shared_prompt(trainer, msg)[0])
    return wire.evaluate_reply_content(
        local_acc=metrics["local-acc"],
        neighbour_acc=metrics["neighbour-acc"],
        zeroshot_local_acc=metrics["zeroshot-local-acc"],
        zeroshot_neighbour_acc=metrics["zeroshot-neighbour-acc"],
        prior_local_acc=metrics["prior-local-acc"],
        prior_neighbour_acc=metrics["prior-neighbour-acc"],
        local_examples=int(metrics["local-examples"]),
        neighbour_examples=int(metrics["neighbour-examples"]),
        partition_id=trainer.partition_id,
    )


def evaluation_contribution(trainer: ClientTrainer, msg: Message, directory: Path) -> np.ndarray:
    """A secure run's evaluation: the counts this client adds to the secure sum.

    Its own figures are logged and kept in ``directory`` (the node's state directory,
    ``evaluation_sum.keep_on_node``) and are never part of a reply.
    """
    metrics = trainer.evaluate(shared_prompt(trainer, msg)[0])
    counts = evaluation_sum.NodeCounts.from_metrics(metrics)
    server_round = int(msg.content[wire.CONFIG_RECORD][wire.SERVER_ROUND])
    evaluation_sum.keep_on_node(directory, server_round, counts)
    return counts.vector()


def secure_contribution(trainer: ClientTrainer, msg: Message) -> np.ndarray:
    """One round of local training; the global-prompt gradient projected onto the C ball.

    The projection keeps the per-sample sensitivity C/B (it is 1-Lipschitz) and puts the
    vector inside the SecAgg input bound even when the Poisson batch exceeded B. No
    noise here: the client's Skellam share is added after quantisation (``secagg``).
    SecFPP: the vector has one block per cluster and this client fills its own only.
    """
    prompt, cluster, clusters = shared_prompt(trainer, msg)
    server_round = int(msg.content[wire.CONFIG_RECORD][wire.SERVER_ROUND])
    outcome = trainer.train_round(prompt, server_round)
    bounded = mechanics.clip_tensor(outcome.global_grad.double(), trainer.cfg.clip_norm)
    blocks = torch.zeros((clusters, bounded.numel()), dtype=torch.float64)
    blocks[cluster] = bounded.flatten()
    return blocks.flatten().numpy()


def cluster_contribution(trainer: ClientTrainer, msg: Message) -> np.ndarray:
    """SecFPP clustering: this client's input to one secure sum (``domain_clusters``).

    The layout may not exceed the search the run config allows (else the server could
    ask for more than the input bound covers); nothing is trained, nothing is counted.
    The input is computed from the client's released summary only (``domain_point``).
    """
    cfg = trainer.cfg
    record = msg.content.config_records[CLUSTER_RECORD]
    arrays = msg.content.array_records[CLUSTER_ARRAYS]
    layout = domain_clusters.Layout(tuple(int(k) for k in record["ks"]))
    allowed = domain_clusters.Layout.search(cfg.max_clusters, cfg.cluster_restarts)
    if len(layout.ks) > len(allowed.ks) or max(layout.ks) > cfg.max_clusters:
        raise ValueError(
            f"clustering layout {layout.ks} exceeds this run's search (max-clusters="
            f"{cfg.max_clusters}, cluster-restarts={cfg.cluster_restarts})"
        )
    return domain_clusters.client_vector(
        str(record["phase"]),
        trainer.domain_point(),
        np.asarray(arrays["centroids"].numpy(), dtype=np.float64),
        layout,
        np.asarray(arrays["open"].numpy()).astype(bool),
    )
