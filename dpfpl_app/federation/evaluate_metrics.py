"""The evaluation round's figures: each client's own, and the means over clients.

The unweighted mean over clients is the paper's number (every client counts once,
whatever its test-set size); the example-weighted mean is reported beside it. Both are
given for the learned prompt and for two references on the same images: the zero-shot
template (``zeroshot-*``) and the class-prior frontier (``prior-*``, zero-shot with the
best own-class bias). A client without local (or neighbour) test examples has no such
accuracy and is left out of that mean.

The headline ``harmonic-acc`` is the mean over clients of each client's harmonic mean
of local and neighbour accuracy (``method.accuracy`` says why not the harmonic mean of
the means); only clients with both kinds of test images have one. ``all-acc`` is the
accuracy over each client's whole test view, averaged over clients (and weighted by
its images in ``all-acc-weighted``). Both are derived from the reply's accuracies and
example counts: they need no field on the wire.
"""

from __future__ import annotations

from statistics import fmean

from dpfpl_app.federation import wire
from dpfpl_app.method.accuracy import all_class, harmonic_mean

SIDES = (  # (prefix of the round keys, local accuracy field, neighbour accuracy field)
    ("", "local_acc", "neighbour_acc"),
    ("zeroshot-", "zeroshot_local_acc", "zeroshot_neighbour_acc"),
    ("prior-", "prior_local_acc", "prior_neighbour_acc"),
)


def per_client_metrics(accepted: list[wire.EvaluateReply]) -> dict[str, float | int]:
    """Each client's own figures, keyed ``local-acc/node-<id>`` (none without examples):
    local, neighbour, harmonic mean and all-class accuracy of the learned prompt.

    ``partition-id/node-<id>`` goes along for results.json's node map.
    """
    out: dict[str, float | int] = {}
    for r in sorted(accepted, key=lambda r: r.node_id):
        figures = {
            wire.LOCAL_ACC: r.local_acc if r.local_examples else None,
            wire.NEIGHBOUR_ACC: r.neighbour_acc if r.neighbour_examples else None,
            wire.HARMONIC_ACC: _harmonic(r, "local_acc", "neighbour_acc"),
            wire.ALL_ACC: _all_class(r, "local_acc", "neighbour_acc"),
        }
        out.update({f"{key}/node-{r.node_id}": v for key, v in figures.items() if v is not None})
        out[f"{wire.PARTITION_ID}/node-{r.node_id}"] = r.partition_id
    return out


def accuracy_means(accepted: list[wire.EvaluateReply]) -> dict[str, float]:
    """Unweighted and example-weighted means of every accuracy the replies carry, and
    the means over clients of their harmonic means and all-class accuracies.
    """
    out: dict[str, float] = {}
    for prefix, local, neighbour in SIDES:
        for side, accuracy, examples in (
            ("local", local, "local_examples"), ("neighbour", neighbour, "neighbour_examples")
        ):
            pairs = [(getattr(r, accuracy), getattr(r, examples)) for r in accepted]
            _put_means(out, f"{prefix}{side}-acc", [(acc, n) for acc, n in pairs if n > 0])
        harmonic = [h for r in accepted if (h := _harmonic(r, local, neighbour)) is not None]
        if harmonic:
            out[f"{prefix}{wire.HARMONIC_ACC}"] = fmean(harmonic)
        _put_means(out, f"{prefix}{wire.ALL_ACC}", [
            (acc, r.local_examples + r.neighbour_examples)
            for r in accepted if (acc := _all_class(r, local, neighbour)) is not None
        ])
    return out


def _put_means(out: dict[str, float], key: str, pairs: list[tuple[float, int]]) -> None:
    """``key``: the mean over clients; ``key-weighted``: weighted by their examples."""
    if pairs:
        out[key] = fmean(acc for acc, _ in pairs)
        out[f"{key}-weighted"] = sum(acc * n for acc, n in pairs) / sum(n for _, n in pairs)


def _harmonic(r: wire.EvaluateReply, local: str, neighbour: str) -> float | None:
    """A client's harmonic mean, if it has both local and neighbour test images."""
    if not (r.local_examples and r.neighbour_examples):
        return None
    return harmonic_mean(getattr(r, local), getattr(r, neighbour))


def _all_class(r: wire.EvaluateReply, local: str, neighbour: str) -> float | None:
    """A client's accuracy over its whole test view (its correct counts, recovered)."""
    return all_class(getattr(r, local) * r.local_examples, r.local_examples,
                     getattr(r, neighbour) * r.neighbour_examples, r.neighbour_examples)
