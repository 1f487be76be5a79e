"""The message protocol between the DP-FPL ServerApp and ClientApp, in one place.

Every record name, array key and metric key that crosses the network is defined here,
and so are the builders that put them into a ``RecordDict`` and the parsers that take
them out again. The parsers are the server's trust boundary: a reply that does not
match the protocol exactly is refused with an :class:`InvalidReply` that says why, so
the strategy can log the node and the reason and carry on without it.

Protocol (all tensors float32, ``n_ctx x d``)::

    server -> client, train / evaluate
        "arrays":  ArrayRecord {"global-prompt"}
        "config":  ConfigRecord {"server-round": int}
    client -> server, train
        "arrays":  ArrayRecord {"global-prompt-grad"}
        "metrics": MetricRecord {"sample-rate"} with DP; {"train-loss"} without DP
                   (``train_metric_keys``)
    client -> server, evaluate
        "metrics": MetricRecord {"num-examples", "local-acc", "neighbour-acc",
                                 "zeroshot-local-acc", "zeroshot-neighbour-acc",
                                 "prior-local-acc", "prior-neighbour-acc",
                                 "local-examples", "neighbour-examples",
                                 "partition-id" (the node's own config: public)}
                   exactly these keys (``EVALUATE_METRIC_KEYS``)

Why so strict: the private local prompt must never leave a client, and with DP nothing
about its training data may leave but the clipped gradient the noise is sized for: no
loss, no example count. The one number a DP reply carries is the node's declared
Poisson rate: public by declaration and fixed before the node read its data (never its
dataset size), so the server can state each node's epsilon; a rate above the run's bound
is refused (``reply_checks``). A train reply's metric keys must be exactly those of its
DP mode. A reply with any
array key other than the global-prompt gradient, any record other than the two above,
or a list-valued metric (a list can carry a whole tensor) is refused, so that a client
bug that leaks it fails loudly instead of silently being averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from dpfpl_app.config import Aggregation
from dpfpl_app.method.accuracy import harmonic_mean

# --- record names -------------------------------------------------------------------
ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
EVALUATION_RECORD = "evaluation"  # fold-evaluation: the previous round's figures in a train reply

# --- array keys ---------------------------------------------------------------------
GLOBAL_PROMPT = "global-prompt"
GLOBAL_PROMPT_GRAD = "global-prompt-grad"
PROMPT_DTYPE = torch.float32

# --- config keys (server -> client) -------------------------------------------------
SERVER_ROUND = "server-round"
AGGREGATION = "aggregation"  # the run's resolved mode: both sides must plan the same noise
EVALUATE_FIRST = "evaluate-first"  # fold-evaluation: evaluate this (previous) round, then train

# --- metric keys (client -> server) ---------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
SAMPLE_RATE = "sample-rate"  # the node's declared Poisson rate (public; DP replies only)
LOCAL_ACC = "local-acc"
NEIGHBOUR_ACC = "neighbour-acc"
LOCAL_EXAMPLES = "local-examples"
NEIGHBOUR_EXAMPLES = "neighbour-examples"
PARTITION_ID = "partition-id"
# the hand-written template's accuracies on the same test images: the reference line a
# learned prompt must beat (test-set accuracies, like local-acc: not DP releases)
ZEROSHOT_LOCAL_ACC = "zeroshot-local-acc"
ZEROSHOT_NEIGHBOUR_ACC = "zeroshot-neighbour-acc"
# the class-prior frontier on the same images (``method.class_prior``): zero-shot plus the
# own-class bias with the best harmonic mean, chosen per client on its test images; of the
# same kind as the accuracies above (test data only, nothing about the training data)
PRIOR_LOCAL_ACC = "prior-local-acc"
PRIOR_NEIGHBOUR_ACC = "prior-neighbour-acc"
EVALUATE_METRIC_KEYS = frozenset(
    {
        NUM_EXAMPLES, LOCAL_ACC, NEIGHBOUR_ACC, ZEROSHOT_LOCAL_ACC, ZEROSHOT_NEIGHBOUR_ACC,
        PRIOR_LOCAL_ACC, PRIOR_NEIGHBOUR_ACC, LOCAL_EXAMPLES, NEIGHBOUR_EXAMPLES, PARTITION_ID,
    }
)

# --- round metric keys (strategy -> ServerApp / results) -----------------------------
EPSILON = "epsilon"  # composed: everything released about a client's data (dp_channel)
ACCEPTED = "accepted"
REJECTED = "rejected"
BYTES_RECEIVED = "bytes-received"
NOISE_STD = "noise-std"
UPDATE_NORM = "update-norm"  # norm of the NOISED mean: a function of the public p_G's
LOCAL_ACC_WEIGHTED = "local-acc-weighted"
NEIGHBOUR_ACC_WEIGHTED = "neighbour-acc-weighted"
ZEROSHOT_LOCAL_ACC_WEIGHTED = "zeroshot-local-acc-weighted"
ZEROSHOT_NEIGHBOUR_ACC_WEIGHTED = "zeroshot-neighbour-acc-weighted"
PRIOR_LOCAL_ACC_WEIGHTED = "prior-local-acc-weighted"
PRIOR_NEIGHBOUR_ACC_WEIGHTED = "prior-neighbour-acc-weighted"
# the headline: the mean over clients of each client's harmonic mean of local and
# neighbour accuracy (``method.accuracy``), for the prompt, zero-shot and the prior
HARMONIC_ACC = "harmonic-acc"
ZEROSHOT_HARMONIC_ACC = "zeroshot-harmonic-acc"
PRIOR_HARMONIC_ACC = "prior-harmonic-acc"
# accuracy over each client's whole test view (local and neighbour images, all classes)
ALL_ACC = "all-acc"
ZEROSHOT_ALL_ACC = "zeroshot-all-acc"
PRIOR_ALL_ACC = "prior-all-acc"
ALL_ACC_WEIGHTED = "all-acc-weighted"
ZEROSHOT_ALL_ACC_WEIGHTED = "zeroshot-all-acc-weighted"
PRIOR_ALL_ACC_WEIGHTED = "prior-all-acc-weighted"
EVAL_ACCEPTED = "eval-accepted"
EVAL_REJECTED = "eval-rejected"


class InvalidReply(ValueError):
    """A client reply the server must not use; the message is the reason, for the log."""


@dataclass(frozen=True)
class TrainReply:
    """A train reply that passed every protocol check."""

    node_id: int
    grad: torch.Tensor
    train_loss: float | None  # only without DP
    sample_rate: float | None  # the node's declared rate: only with DP


@dataclass(frozen=True)
class EvaluateReply:
    """An evaluate reply that passed every protocol check."""

    node_id: int
    num_examples: int
    local_acc: float
    neighbour_acc: float
    zeroshot_local_acc: float
    zeroshot_neighbour_acc: float
    prior_local_acc: float
    prior_neighbour_acc: float
    local_examples: int
    neighbour_examples: int
    partition_id: int


# --- builders -----------------------------------------------------------------------
def global_prompt_record(prompt: torch.Tensor) -> ArrayRecord:
    """Build the ArrayRecord the server broadcasts: the global prompt and nothing else."""
    return ArrayRecord({GLOBAL_PROMPT: Array(prompt.detach().to(PROMPT_DTYPE).contiguous())})


def read_aggregation(content: RecordDict) -> Aggregation:
    """The aggregation mode the server resolved for this run (``plain`` or ``secure``)."""
    value = content[CONFIG_RECORD].get(AGGREGATION)
    if value not in {Aggregation.PLAIN.value, Aggregation.SECURE.value}:
        raise ValueError(
            f"the message's config has {AGGREGATION}={value!r}, expected 'plain' or 'secure': "
            "the ServerApp must be the same dpfpl version as this ClientApp"
        )
    return Aggregation(value)


def read_global_prompt(arrays: ArrayRecord) -> torch.Tensor:
    """Read the global prompt out of a broadcast ArrayRecord (client side, or a Result).

    Raises
    ------
    ValueError
        If the record holds anything but one 2-D float32 ``global-prompt``.

    """
    if set(arrays.keys()) != {GLOBAL_PROMPT}:
        raise ValueError(
            f"expected exactly the array key '{GLOBAL_PROMPT}', got {sorted(arrays.keys())}"
        )
    prompt = torch.from_numpy(np.array(arrays[GLOBAL_PROMPT].numpy(), copy=True))
    if prompt.dim() != 2 or prompt.dtype != PROMPT_DTYPE:
        raise ValueError(
            f"'{GLOBAL_PROMPT}' must be a 2-D {PROMPT_DTYPE} tensor, "
            f"got shape {tuple(prompt.shape)} dtype {prompt.dtype}"
        )
    return prompt


def train_metric_keys(dp_on: bool) -> frozenset[str]:
    """The exact metric keys of a train reply: the declared rate with DP, the batch loss
    without.
    """
    return frozenset({SAMPLE_RATE}) if dp_on else frozenset({TRAIN_LOSS})


def train_reply_content(
    *, grad: torch.Tensor, train_loss: float, dp_on: bool, sample_rate: float | None
) -> RecordDict:
    """Build a client's train reply content, exactly as the server expects it.

    ``sample_rate`` is the node's declared rate, required with DP (``privacy.dp_channel``).
    """
    if dp_on and sample_rate is None:
        raise ValueError("a DP train reply states the node's declared sample rate")
    metrics = MetricRecord(
        {SAMPLE_RATE: float(sample_rate)} if dp_on else {TRAIN_LOSS: float(train_loss)}  # type: ignore[arg-type]
    )
    return RecordDict(
        {
            ARRAYS_RECORD: ArrayRecord(
                {GLOBAL_PROMPT_GRAD: Array(grad.detach().to(PROMPT_DTYPE).contiguous())}
            ),
            METRICS_RECORD: metrics,
        }
    )


def evaluate_reply_content(
    *,
    local_acc: float,
    neighbour_acc: float,
    zeroshot_local_acc: float,
    zeroshot_neighbour_acc: float,
    prior_local_acc: float,
    prior_neighbour_acc: float,
    local_examples: int,
    neighbour_examples: int,
    partition_id: int,
) -> RecordDict:
    """Build a client's evaluate reply content (metrics only: no arrays leave).

    An accuracy over no examples (a client holding every class has no neighbour data)
    travels as 0.0 with a count of 0: NaN would fail the server's checks, and the
    server's means skip entries with no examples. ``partition_id`` is the node's
    ``--node-config`` value, already known to its operator: it lets results.json map
    node ids to partitions and to where each node keeps its exported prompt.
    """
    return RecordDict(
        {
            METRICS_RECORD: MetricRecord(
                {
                    NUM_EXAMPLES: int(local_examples + neighbour_examples),
                    LOCAL_ACC: float(local_acc) if local_examples else 0.0,
                    NEIGHBOUR_ACC: float(neighbour_acc) if neighbour_examples else 0.0,
                    ZEROSHOT_LOCAL_ACC: float(zeroshot_local_acc) if local_examples else 0.0,
                    ZEROSHOT_NEIGHBOUR_ACC: (
                        float(zeroshot_neighbour_acc) if neighbour_examples else 0.0
                    ),
                    PRIOR_LOCAL_ACC: float(prior_local_acc) if local_examples else 0.0,
                    PRIOR_NEIGHBOUR_ACC: float(prior_neighbour_acc) if neighbour_examples else 0.0,
                    LOCAL_EXAMPLES: int(local_examples),
                    NEIGHBOUR_EXAMPLES: int(neighbour_examples),
                    PARTITION_ID: int(partition_id),
                }
            )
        }
    )


def fold_evaluation(train: RecordDict, evaluation: RecordDict) -> RecordDict:
    """A train reply that also carries the previous round's evaluation (fold-evaluation)."""
    return RecordDict({**dict(train.items()), EVALUATION_RECORD: evaluation[METRICS_RECORD]})


# --- parsers (the server's trust boundary) -------------------------------------------
def reply_array_bytes(msg: Message) -> int:
    """Bytes of all ArrayRecords in a reply (0 for an error reply)."""
    if msg.has_error():
        return 0
    return sum(record.count_bytes() for record in msg.content.array_records.values())


def validate_grad_reply(
    reply_arrays: ArrayRecord, expected_shape: tuple[int, ...], expected_dtype: torch.dtype
) -> torch.Tensor:
    """Return the global-prompt gradient of a reply's ArrayRecord, or raise InvalidReply.

    The array is decoded (numpy, never pickle) and its actual shape and dtype are
    checked, not the metadata the client declared, so a reply cannot lie about them.
    """
    keys = set(reply_arrays.keys())
    if GLOBAL_PROMPT_GRAD not in keys:
        raise InvalidReply(f"missing array '{GLOBAL_PROMPT_GRAD}' (got {sorted(keys)})")
    if keys != {GLOBAL_PROMPT_GRAD}:
        raise InvalidReply(
            f"unexpected array keys {sorted(keys - {GLOBAL_PROMPT_GRAD})}: only "
            f"'{GLOBAL_PROMPT_GRAD}' may leave a client (a private prompt must not)"
        )
    try:
        array = reply_arrays[GLOBAL_PROMPT_GRAD].numpy()
    except (TypeError, ValueError, OSError, EOFError) as err:
        raise InvalidReply(f"'{GLOBAL_PROMPT_GRAD}' cannot be decoded: {err}") from err
    expected_np = torch.empty(0, dtype=expected_dtype).numpy().dtype
    if array.dtype != expected_np:
        raise InvalidReply(
            f"'{GLOBAL_PROMPT_GRAD}' has dtype {array.dtype}, expected {expected_np}"
        )
    if tuple(array.shape) != tuple(expected_shape):
        raise InvalidReply(
            f"'{GLOBAL_PROMPT_GRAD}' has shape {tuple(array.shape)}, "
            f"expected {tuple(expected_shape)}"
        )
    if not np.isfinite(array).all():
        raise InvalidReply(f"'{GLOBAL_PROMPT_GRAD}' contains NaN or Inf")
    return torch.from_numpy(np.array(array, copy=True))


def parse_train_reply(
    msg: Message,
    *,
    expected_shape: tuple[int, ...],
    expected_dtype: torch.dtype,
    dp_on: bool,
    folded: bool = False,
) -> TrainReply:
    """Check a train reply against the protocol; :class:`InvalidReply` says why not.

    ``folded``: the message asked for the previous round's evaluation too, so the reply
    may carry it (``parse_folded_evaluation`` checks it); otherwise it may not.
    """
    _check_no_error(msg)
    _check_records(msg.content, arrays=True, folded=folded)
    grad = validate_grad_reply(
        msg.content.array_records[ARRAYS_RECORD], expected_shape, expected_dtype
    )
    metrics = msg.content.metric_records[METRICS_RECORD]
    expected = train_metric_keys(dp_on)
    if set(metrics.keys()) != expected:
        raise InvalidReply(
            f"train metrics {sorted(metrics.keys())}, expected exactly {sorted(expected)}: "
            "with DP a reply carries nothing but the clipped gradient and the declared rate"
        )
    _check_scalar_metrics(metrics)
    loss = None if dp_on else _float_metric(metrics, TRAIN_LOSS, low=-math.inf, high=math.inf)
    rate = _float_metric(metrics, SAMPLE_RATE, low=0.0, high=1.0) if dp_on else None
    if rate is not None and rate <= 0.0:
        raise InvalidReply(f"metric '{SAMPLE_RATE}' must be in (0, 1], got {rate!r}")
    return TrainReply(
        node_id=msg.metadata.src_node_id, grad=grad, train_loss=loss, sample_rate=rate
    )


def parse_evaluate_reply(msg: Message) -> EvaluateReply:
    """Check an evaluate reply against the protocol; :class:`InvalidReply` says why not."""
    _check_no_error(msg)
    _check_records(msg.content, arrays=False)
    return _evaluate_reply(msg.metadata.src_node_id, msg.content.metric_records[METRICS_RECORD])


def parse_folded_evaluation(msg: Message) -> EvaluateReply:
    """The previous round's evaluation in a train reply (fold-evaluation), checked like an
    evaluate reply's.
    """
    _check_no_error(msg)
    metrics = msg.content.metric_records.get(EVALUATION_RECORD)
    if metrics is None:
        raise InvalidReply(f"no '{EVALUATION_RECORD}' record: the message asked for one")
    return _evaluate_reply(msg.metadata.src_node_id, metrics)


def _evaluate_reply(node_id: int, metrics: MetricRecord) -> EvaluateReply:
    _check_scalar_metrics(metrics)
    if set(metrics.keys()) != EVALUATE_METRIC_KEYS:
        raise InvalidReply(
            f"evaluate metrics {sorted(metrics.keys())} are not exactly "
            f"{sorted(EVALUATE_METRIC_KEYS)}"
        )
    reply = EvaluateReply(
        node_id=node_id,
        num_examples=_int_metric(metrics, NUM_EXAMPLES, minimum=0),
        local_acc=_float_metric(metrics, LOCAL_ACC, low=0.0, high=1.0),
        neighbour_acc=_float_metric(metrics, NEIGHBOUR_ACC, low=0.0, high=1.0),
        zeroshot_local_acc=_float_metric(metrics, ZEROSHOT_LOCAL_ACC, low=0.0, high=1.0),
        zeroshot_neighbour_acc=_float_metric(metrics, ZEROSHOT_NEIGHBOUR_ACC, low=0.0, high=1.0),
        prior_local_acc=_float_metric(metrics, PRIOR_LOCAL_ACC, low=0.0, high=1.0),
        prior_neighbour_acc=_float_metric(metrics, PRIOR_NEIGHBOUR_ACC, low=0.0, high=1.0),
        local_examples=_int_metric(metrics, LOCAL_EXAMPLES, minimum=0),
        neighbour_examples=_int_metric(metrics, NEIGHBOUR_EXAMPLES, minimum=0),
        partition_id=_int_metric(metrics, PARTITION_ID, minimum=0),
    )
    _check_prior_frontier(reply)
    return reply


def _check_prior_frontier(reply: EvaluateReply) -> None:
    """The frontier includes b = 0 (zero-shot itself): its harmonic mean is never lower."""
    if not (reply.local_examples and reply.neighbour_examples):
        return
    prior = harmonic_mean(reply.prior_local_acc, reply.prior_neighbour_acc)
    zeroshot = harmonic_mean(reply.zeroshot_local_acc, reply.zeroshot_neighbour_acc)
    if prior < zeroshot - 1e-9:
        raise InvalidReply(
            f"class-prior harmonic mean {prior:.6g} is below zero-shot's {zeroshot:.6g}: "
            "the frontier includes zero-shot (bias 0), so the reply is inconsistent"
        )


def _check_no_error(msg: Message) -> None:
    if msg.has_error():
        raise InvalidReply(f"error reply (code {msg.error.code}): {msg.error.reason}")
    if not msg.has_content():
        raise InvalidReply("reply has neither content nor error")


def _check_records(content: RecordDict, *, arrays: bool, folded: bool = False) -> None:
    """Exactly the records of the protocol: nothing more can smuggle data out.

    ``folded``: a train reply may add the previous round's evaluation; a missing one is
    the evaluation's refusal, not the training's.
    """
    metrics = {METRICS_RECORD, EVALUATION_RECORD} if folded else {METRICS_RECORD}
    expected = {ARRAYS_RECORD, *metrics} if arrays else metrics
    got = set(content.keys())
    if got - expected:
        raise InvalidReply(
            f"unexpected records {sorted(got - expected)} (expected {sorted(expected)})"
        )
    if arrays and set(content.array_records.keys()) != {ARRAYS_RECORD}:
        raise InvalidReply(f"expected one ArrayRecord '{ARRAYS_RECORD}', got {sorted(got)}")
    names = set(content.metric_records.keys())
    if METRICS_RECORD not in names or names - metrics:
        raise InvalidReply(f"expected the MetricRecord '{METRICS_RECORD}', got {sorted(got)}")


def _check_scalar_metrics(metrics: MetricRecord) -> None:
    lists = sorted(key for key, value in metrics.items() if isinstance(value, list))
    if lists:
        raise InvalidReply(f"list-valued metrics {lists}: every metric must be a scalar")


def _int_metric(metrics: MetricRecord, key: str, *, minimum: int) -> int:
    if key not in metrics:
        raise InvalidReply(f"missing metric '{key}'")
    value = metrics[key]
    if not isinstance(value, int) or value < minimum:
        raise InvalidReply(f"metric '{key}' must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _float_metric(metrics: MetricRecord, key: str, *, low: float, high: float) -> float:
    if key not in metrics:
        raise InvalidReply(f"missing metric '{key}'")
    value = metrics[key]
    if not isinstance(value, int | float) or math.isnan(value):
        raise InvalidReply(f"metric '{key}' must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidReply(f"metric '{key}' must be finite and in [{low}, {high}], got {value!r}")
    return value
