"""The evaluation round's figures: each client's own, and the means over clients.

The unweighted mean over clients is the paper's number (every client counts once,
whatever its test-set size); the example-weighted mean is reported beside it. Both are
given for the learned prompt and for the zero-shot template on the same images (the
reference line). A client without local (or neighbour) test examples has no such
accuracy and is left out of that mean.
"""

from __future__ import annotations

from dpfpl_app.federation import wire


def per_client_metrics(accepted: list[wire.EvaluateReply]) -> dict[str, float | int]:
    """Each client's own accuracies, keyed ``local-acc/node-<id>`` (none without examples).

    ``partition-id/node-<id>`` goes along for results.json's node map.
    """
    out: dict[str, float | int] = {}
    for r in sorted(accepted, key=lambda r: r.node_id):
        if r.local_examples:
            out[f"{wire.LOCAL_ACC}/node-{r.node_id}"] = r.local_acc
        if r.neighbour_examples:
            out[f"{wire.NEIGHBOUR_ACC}/node-{r.node_id}"] = r.neighbour_acc
        out[f"{wire.PARTITION_ID}/node-{r.node_id}"] = r.partition_id
    return out


def accuracy_means(accepted: list[wire.EvaluateReply]) -> dict[str, float]:
    """Unweighted and example-weighted means of every accuracy the replies carry."""
    columns = (  # (mean key, weighted key, accuracy of a reply, its example count)
        (wire.LOCAL_ACC, wire.LOCAL_ACC_WEIGHTED, "local_acc", "local_examples"),
        (wire.NEIGHBOUR_ACC, wire.NEIGHBOUR_ACC_WEIGHTED, "neighbour_acc", "neighbour_examples"),
        (wire.ZEROSHOT_LOCAL_ACC, wire.ZEROSHOT_LOCAL_ACC_WEIGHTED, "zeroshot_local_acc",
         "local_examples"),
        (wire.ZEROSHOT_NEIGHBOUR_ACC, wire.ZEROSHOT_NEIGHBOUR_ACC_WEIGHTED,
         "zeroshot_neighbour_acc", "neighbour_examples"),
    )
    out: dict[str, float] = {}
    for key, weighted_key, accuracy, examples in columns:
        pairs = [(getattr(r, accuracy), getattr(r, examples)) for r in accepted]
        pairs = [(acc, n) for acc, n in pairs if n > 0]
        if pairs:
            out[key] = sum(acc for acc, _ in pairs) / len(pairs)
            out[weighted_key] = sum(acc * n for acc, n in pairs) / sum(n for _, n in pairs)
    return out
